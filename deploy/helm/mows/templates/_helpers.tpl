{{- define "mows.name" -}}{{ .Release.Name }}{{- end -}}
{{- define "mows.labels" -}}
app.kubernetes.io/name: mows
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}
{{- define "mows.secretName" -}}
{{- if .Values.cluster.existingSecret -}}{{ .Values.cluster.existingSecret }}{{- else -}}{{ include "mows.name" . }}-cluster-secret{{- end -}}
{{- end -}}
{{- /* A whole, positive number of GiB from a value, or fail naming it. */ -}}
{{- define "mows.gib" -}}
{{- $v := index . 1 -}}
{{- if not (and (gt (float64 $v) 0.0) (eq (float64 $v) (float64 (int64 $v)))) -}}
{{- fail (printf "%s must be a positive whole number of GiB, got %v" (index . 0) $v) -}}
{{- end -}}
{{- int64 $v -}}
{{- end -}}
{{- /* The pool's cap in GiB: max_memory in the config. */ -}}
{{- define "mows.poolGiB" -}}
{{- if hasKey .Values "maxMemory" -}}
{{- fail "maxMemory was replaced by pool.maxMemoryGiB (a number of GiB)" -}}
{{- end -}}
{{- include "mows.gib" (list "pool.maxMemoryGiB" .Values.pool.maxMemoryGiB) -}}
{{- end -}}
{{- /* The container's memory request and limit: the pool's tmpfs pages are charged to the
daemon's memory cgroup, so limit = pool.maxMemoryGiB + resources.overheadGiB. */ -}}
{{- define "mows.memory" -}}
{{- $overhead := include "mows.gib" (list "resources.overheadGiB" .Values.resources.overheadGiB) -}}
{{- add (include "mows.poolGiB" .) $overhead }}Gi
{{- end -}}
{{- /* With etcd: https endpoints and a client certificate, never plaintext to the directory. */ -}}
{{- define "mows.checkEtcd" -}}
{{- range .Values.cluster.etcd -}}
{{- if not (hasPrefix "https://" .) -}}
{{- fail (printf "cluster.etcd: %q is not https://; the daemon reaches etcd over TLS with a client certificate (cluster.etcdTLSSecret)" .) -}}
{{- end -}}
{{- end -}}
{{- if not .Values.cluster.etcdTLSSecret -}}
{{- fail "cluster.etcdTLSSecret is required with cluster.etcd: the name of a Secret holding ca.crt, tls.crt and tls.key (etcd's CA and this daemon's client certificate; deploy/k8s/etcd-certs.sh makes them)" -}}
{{- end -}}
{{- if and .Values.cluster.etcdUser (not .Values.cluster.etcdPasswordSecret) -}}
{{- fail "cluster.etcdUser needs cluster.etcdPasswordSecret: the name of a Secret holding key \"password\"" -}}
{{- end -}}
{{- end -}}
