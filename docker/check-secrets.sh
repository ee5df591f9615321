#!/bin/sh
# Refuse to start the stack while a secret is empty or still the example's
# placeholder (docker/.env.example: change-me-*). Run by compose's `check-secrets`
# job, which every service waits for. CHECK_VARIABLES: the variables to check. It
# prints the variables' names, never their values.
set -eu
bad=""
for name in ${CHECK_VARIABLES:?CHECK_VARIABLES lists the secrets to check}; do
    eval "value=\${$name:-}"
    case "$value" in
        "" | change-me*) bad="$bad $name" ;;
    esac
done
if [ -n "$bad" ]; then
    echo "check-secrets: empty or placeholder (change-me-*) secret(s):$bad; set real values in docker/.env (openssl rand -hex 24) and start again" >&2
    exit 1
fi
echo "check-secrets: $(echo "$CHECK_VARIABLES" | wc -w) secrets set, none a placeholder"
