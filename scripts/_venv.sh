# Sourced (not run) by scripts/demo, scripts/devnet and scripts/test:
#
#   . "$ROOT/scripts/_venv.sh"; p2pgpu_ensure_venv "$ROOT" [quiet]
#
# creates $ROOT/.venv when missing and installs p2pgpu with its test extras
# when it is not installed yet or pyproject.toml changed since. The first
# install takes a minute or more; it is never silent for long: each package
# pip collects and each wheel it builds is a line on stderr with the seconds
# since the start ("quiet": instead a count every 15 s, and the wheels built,
# for CI logs). pip's whole output goes to .venv/install.log, whose tail is
# shown when the install fails. Several scripts starting at once (parallel
# `scripts/devnet` commands) install once: the second waits on a lock.

_p2pgpu_pip_progress() {  # LOG QUIET START: pip's output on stdin -> LOG, its steps -> stderr
  local log=$1 quiet=$2 start=$3 collected=0 shown=$SECONDS line
  while IFS= read -r line; do
    printf '%s\n' "$line" >>"$log"
    case $line in
      Collecting*)
        collected=$((collected + 1))
        [ "$quiet" = quiet ] || echo "   [$((SECONDS - start)) s] ${line%% (from *}" >&2 ;;
      "Building wheel"* | "Building editable"* | "Installing collected packages"* | ERROR* | error:*)
        echo "   [$((SECONDS - start)) s] ${line:0:120}" >&2 ;;
      "Successfully installed"*)
        echo "   [$((SECONDS - start)) s] installed $(($(wc -w <<<"$line") - 2)) packages" >&2 ;;
    esac
    if [ "$quiet" = quiet ] && [ $((SECONDS - shown)) -ge 15 ]; then
      echo "   [$((SECONDS - start)) s] ... $collected packages collected so far" >&2
      shown=$SECONDS
    fi
  done
}

_p2pgpu_install() {  # ROOT QUIET
  local root=$1 quiet=$2 log="$1/.venv/install.log" start=$SECONDS
  local -
  set -o pipefail  # the pipeline fails when pip does
  echo "== installing p2pgpu and its dependencies into .venv (first run only, a minute or more; pip's output: .venv/install.log)" >&2
  : >"$log"
  if ! (cd "$root" && export PYTHONUNBUFFERED=1 && .venv/bin/python -m pip install --progress-bar off --upgrade pip \
          && .venv/bin/python -m pip install --progress-bar off -e '.[test]') 2>&1 \
       | _p2pgpu_pip_progress "$log" "$quiet" "$start"; then
    echo "== the install failed; the end of $log:" >&2
    tail -n 30 "$log" >&2
    return 1
  fi
  touch "$root/.venv/.p2pgpu-installed"
  echo "== installed in $((SECONDS - start)) s" >&2
}

p2pgpu_ensure_venv() {  # ROOT [quiet]
  local root=$1 quiet=${2:-} stamp="$1/.venv/.p2pgpu-installed"
  if [ ! -x "$root/.venv/bin/python" ]; then
    echo "== creating .venv" >&2
    "${PYTHON:-python3}" -m venv "$root/.venv"
  fi
  if [ -f "$stamp" ] && [ ! "$root/pyproject.toml" -nt "$stamp" ]; then
    return 0
  fi
  if command -v flock >/dev/null; then
    exec 9>"$root/.venv/.p2pgpu-install.lock"
    flock 9
    if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
      _p2pgpu_install "$root" "$quiet" || { exec 9>&-; return 1; }
    fi
    exec 9>&-
  else
    _p2pgpu_install "$root" "$quiet"
  fi
}
