#!/bin/sh
# Creates alpipe's bucket in MinIO (or any S3), idempotently, then exits 0. Run by the minio-init
# service of docker-compose.yml in the minio/mc image; deploy/k8s/minio-init-job.yaml does the same.
# Reads the settings the services read: ALPIPE_S3_ENDPOINT (host:port), ALPIPE_S3_SECURE,
# ALPIPE_S3_ACCESS_KEY, ALPIPE_S3_SECRET_KEY, ALPIPE_S3_BUCKET.
set -eu

endpoint="${ALPIPE_S3_ENDPOINT:?set ALPIPE_S3_ENDPOINT to the server host:port, e.g. minio:9000}"
bucket="${ALPIPE_S3_BUCKET:-alpipe}"
case "${ALPIPE_S3_SECURE:-false}" in
    1 | [Tt]rue | TRUE | [Yy]es | YES | [Oo]n | ON) scheme=https ;;
    *) scheme=http ;;
esac
url="$scheme://$endpoint"
tries="${MINIO_INIT_TRIES:-60}"
pause="${MINIO_INIT_SLEEP:-2}"

# `mc alias set` checks the credentials against the server, so it also waits for the server to be up.
n=0
until mc alias set alpipe "$url" "${ALPIPE_S3_ACCESS_KEY:?}" "${ALPIPE_S3_SECRET_KEY:?}" >/dev/null; do
    n=$((n + 1))
    if [ "$n" -ge "$tries" ]; then
        echo "minio-init: $url did not accept the credentials after $tries tries" >&2
        exit 1
    fi
    sleep "$pause"
done

mc mb --ignore-existing "alpipe/$bucket"
echo "minio-init: bucket $bucket is ready at $url"
