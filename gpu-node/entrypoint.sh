#!/bin/sh
# Entrypoint of the `ollama` service of gpu-node/docker-compose.yml.
#
# 1. starts `ollama serve` in the background;
# 2. waits until `ollama list` answers (PULL_WAIT_TRIES tries, PULL_WAIT_INTERVAL
#    seconds apart; defaults 120 x 1 s), then pulls every model of PULL_MODELS;
# 3. waits on the server and forwards SIGTERM/SIGINT to it, so `docker stop`
#    is clean.
#
# PULL_MODELS is a list of model names separated by commas (spaces and
# newlines separate too; empty entries are skipped), e.g.
#     PULL_MODELS="llama3.2, qwen2.5:7b, nomic-embed-text"
# The compose file fills it from OLLAMA_MODELS in .env. It has its own name
# because inside the Ollama image OLLAMA_MODELS is Ollama's model *directory*.
#
# A failed pull is reported on stderr and does not stop the server: the node
# keeps serving the models it already has, and the pulls run again at the
# next start. The pulls run beside the server, so the container's healthcheck
# (`ollama list`) passes before they finish; gpumanager checks /api/tags for
# the model it needs before it sends a request.
#
# POSIX sh (the image's /bin/sh is dash). SIGINT is forwarded as SIGTERM:
# a background job of a non-interactive shell starts with SIGINT ignored.

set -eu

PULL_MODELS="${PULL_MODELS:-}"
PULL_WAIT_TRIES="${PULL_WAIT_TRIES:-120}"
PULL_WAIT_INTERVAL="${PULL_WAIT_INTERVAL:-1}"

log() {
    printf 'entrypoint: %s\n' "$*" >&2
}

# Wait for Ollama, then pull the models. Runs as a background job (`{ }`, not
# `( )`: a subshell body would fork once more, and the job's pid would not be
# the process that holds the trap). Every step that can take long runs as a
# child that the job waits for, so a SIGTERM from the main shell stops it at once.
pull_models() {
    child=
    forking=
    stopping=
    stop_child() {
        if [ -n "$child" ]; then
            kill -TERM "$child" 2>/dev/null || true
            wait "$child" 2>/dev/null || true
        fi
        exit 143
    }
    # A trap runs between two commands, so it can come after `"$@" &` and
    # before `child=$!`, when $child does not name the new child yet (and $!
    # of this job is inherited: before its first child it is the server's
    # pid). Then run() stops the child itself once it knows its pid.
    trap 'stopping=1; [ -n "$forking" ] || stop_child' TERM

    run() {
        forking=1
        "$@" &
        child=$!
        forking=
        if [ -n "$stopping" ]; then stop_child; fi
        wait "$child"
    }

    tries=0
    until run ollama list >/dev/null 2>&1; do
        tries=$((tries + 1))
        if [ "$tries" -ge "$PULL_WAIT_TRIES" ]; then
            log "ollama did not answer after $tries tries; no model pulled"
            exit 1
        fi
        run sleep "$PULL_WAIT_INTERVAL"
    done
    log "ollama is up"

    failed=
    set -f
    IFS=',
	 '
    for model in $PULL_MODELS; do
        [ -n "$model" ] || continue
        log "pulling $model"
        if run ollama pull "$model"; then
            log "pulled $model"
        else
            status=$?
            log "pull of $model failed (exit $status); the server keeps running"
            failed="$failed $model"
        fi
    done
    child=

    if [ -n "$failed" ]; then
        log "models not pulled:$failed"
        exit 1
    fi
    log "all models pulled"
}

server_pid=
puller_pid=
stopping=
stop() {
    log "received SIG$1, stopping ollama"
    stopping=1
    if [ -n "$puller_pid" ]; then kill -TERM "$puller_pid" 2>/dev/null || true; fi
    if [ -n "$server_pid" ]; then kill -TERM "$server_pid" 2>/dev/null || true; fi
}
# A shell cannot trap a signal that was ignored when it started (POSIX), so
# SIGINT does nothing here if this script inherits it ignored (e.g. from a
# program started as a background job of a non-interactive shell). A
# container's first process starts with no signal ignored.
trap 'stop TERM' TERM
trap 'stop INT' INT

ollama serve &
server_pid=$!
# A signal that came before server_pid was set stopped nothing: stop now.
if [ -n "$stopping" ]; then kill -TERM "$server_pid" 2>/dev/null || true; fi

if [ -z "$stopping" ]; then
    pull_models &
    puller_pid=$!
fi

# `wait` returns early when a trapped signal arrives: wait again until the
# server is really gone (kill -0 still succeeds while it is an unreaped zombie).
status=0
while :; do
    if wait "$server_pid"; then status=0; else status=$?; fi
    kill -0 "$server_pid" 2>/dev/null || break
done

# The server is gone (stopped by a signal, or it died): stop the pulls too,
# so the container exits and its restart policy applies.
if [ -n "$puller_pid" ]; then
    kill -TERM "$puller_pid" 2>/dev/null || true
    wait "$puller_pid" 2>/dev/null || true
fi
log "ollama exited with status $status"
exit "$status"
