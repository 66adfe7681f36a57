# Shared helpers of the GPU recipes that train the toy within a fixed time budget (train/toy_gpu.sh,
# train/toy_gpu_rows.sh); sourced, not run. Every stage is bounded by the budget, and every result is packed whole
# (written beside, then renamed) and cut into parts when large, for a GPU job that hands back few files of limited size.
# The time is read by `now`: the system clock, or the whole seconds in the file $CLOCK_FILE when that is set, which
# lets a caller (the tests) move time forward without waiting.
now() { if [ -n "${CLOCK_FILE:-}" ]; then cat "$CLOCK_FILE"; else date +%s; fi; }
START=$(now)
SPLIT_MB=${SPLIT_MB:-15}
left() { echo $((BUDGET - ($(now) - START))); }
log() { echo "[${LOG_TAG:-gpu} +$(($(now) - START))s] $*"; }
# bounded SECONDS_KEPT CMD...: run CMD until only SECONDS_KEPT of the budget are left (rc 124 when cut off). `timeout`
# bounds it by the system clock; the watch loop stops it (TERM, then KILL after 5 s) as soon as `left` says so, which
# is what ends it when the time comes from $CLOCK_FILE.
bounded() {
  local keep=$1 t pid; shift
  t=$(($(left) - keep)); if [ "$t" -lt 5 ]; then return 124; fi
  timeout -k 5 "$t" "$@" &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$(left)" -le "$keep" ]; then kill -TERM "$pid" 2>/dev/null; wait "$pid"; return 124; fi
    sleep 0.5
  done
  wait "$pid"
}
# pack NAME TAR-ARGS...: $PACK/NAME written beside and renamed, or cut into NAME.00, NAME.01, ... if over SPLIT_MB
pack() {
  local name=$1 tmp; shift; tmp=$(mktemp -d "$PACK/.pack.XXXX")
  tar -cf "$tmp/$name" "$@" || { rm -rf "$tmp"; return 1; }
  if [ "$(stat -c %s "$tmp/$name")" -gt $((SPLIT_MB * 1048576)) ]; then
    split -b "${SPLIT_MB}M" -d "$tmp/$name" "$tmp/$name." && rm "$tmp/$name"
  fi
  mv "$tmp"/* "$PACK/" && rmdir "$tmp"
}
# latest DIR: its newest complete checkpoint-N folder (empty when none); checkpoint-N.tmp-* is one being written
latest() { ls -d "$1"/checkpoint-* 2>/dev/null | grep -E '/checkpoint-[0-9]+$' | sort -V | tail -1; }
