#!/bin/sh
# The image's entrypoint: runs its command, after one check for `inferq worker`: the checkpoint given as --model
# must be there. Without it the worker would stop on a tokenizer error that does not name the cause, and an unset
# MODEL_DIR in docker-compose.yml mounts nothing useful at /models/model.
set -eu
if [ "${1:-}" = inferq ] && [ "${2:-}" = worker ]; then
    model="" previous=""
    for arg in "$@"; do
        case "$arg" in --model=*) model="${arg#--model=}" ;; esac
        [ "$previous" = --model ] && model="$arg"
        previous="$arg"
    done
    if [ -n "$model" ] && [ ! -f "$model/config.json" ] && ! { [ -f "$model" ] && [ "${model%.gguf}" != "$model" ]; }; then
        echo "inferq worker: $model is not a model: no config.json there (nor a .gguf file)." >&2
        echo "Mount a Hugging Face checkpoint directory there: with docker compose, set MODEL_DIR to it" \
             "(and MODEL_NAME to the name clients use)." >&2
        ls -la "$model" >&2 2>/dev/null || true
        exit 64
    fi
fi
exec "$@"
