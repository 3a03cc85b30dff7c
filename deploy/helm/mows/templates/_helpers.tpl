{{- define "mows.name" -}}{{ .Release.Name }}{{- end -}}
{{- define "mows.labels" -}}
app.kubernetes.io/name: mows
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}
{{- define "mows.secretName" -}}
{{- if .Values.cluster.existingSecret -}}{{ .Values.cluster.existingSecret }}{{- else -}}{{ include "mows.name" . }}-cluster-secret{{- end -}}
{{- end -}}
