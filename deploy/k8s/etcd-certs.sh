#!/bin/sh
# Certificates for the example etcd (etcd.yaml) and the mows daemons, with openssl:
#   ca.crt/ca.key          a CA for this etcd only (keep ca.key offline)
#   server.crt/server.key  etcd's certificate, for clients and peers (serverAuth, clientAuth)
#   client.crt/client.key  the daemons' client certificate (CN=mows)
# Usage: etcd-certs.sh DIR [NAMESPACE [CLUSTER_DOMAIN]], then create the Secrets it prints.
set -eu
dir=${1:?usage: etcd-certs.sh DIR [NAMESPACE [CLUSTER_DOMAIN]]}
ns=${2:-mows}
domain=${3:-cluster.local}
days=${DAYS:-825}
mkdir -p "$dir"
cd "$dir"
umask 077

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key ca.key
openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=mows-etcd-ca" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.crt

sign() {  # NAME CN EXTENSIONS
    key "$1.key"
    openssl req -new -key "$1.key" -subj "/CN=$2" -out "$1.csr"
    printf '%s\n' "$3" >"$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 \
        -days "$days" -extfile "$1.ext" -out "$1.crt" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}

svc="mows-etcd.$ns.svc"
san="DNS:*.$svc,DNS:*.$svc.$domain,DNS:mows-etcd-client.$ns.svc"
san="$san,DNS:mows-etcd-client.$ns.svc.$domain,DNS:localhost,IP:127.0.0.1"
for i in 0 1 2; do san="$san,DNS:mows-etcd-$i.$svc"; done
sign server mows-etcd "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$san"
sign client mows "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
chmod 0644 ca.crt server.crt client.crt

cat <<EOF
Wrote $(pwd)/{ca,server,client}.{crt,key}. Create the Secrets:
  kubectl -n $ns create secret generic mows-etcd-tls --from-file=ca.crt=$dir/ca.crt \\
      --from-file=tls.crt=$dir/server.crt --from-file=tls.key=$dir/server.key
  kubectl -n $ns create secret generic mows-etcd-client-tls --from-file=ca.crt=$dir/ca.crt \\
      --from-file=tls.crt=$dir/client.crt --from-file=tls.key=$dir/client.key
EOF
