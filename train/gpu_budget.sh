# Shared helpers of the one-shot GPU scripts (train/toy_gpu.sh, train/toy_gpu_rows.sh); sourced, not run.
# A GPU job with a hard time limit may hand back only a few files of limited size: every stage is bounded by the budget,
# and every result is packed whole (written beside, then renamed) and cut into parts when large.
START=$(date +%s)
SPLIT_MB=${SPLIT_MB:-15}
left() { echo $((BUDGET - ($(date +%s) - START))); }
log() { echo "[${LOG_TAG:-gpu} +$(($(date +%s) - START))s] $*"; }
# bounded SECONDS_KEPT CMD...: run CMD until only SECONDS_KEPT of the budget are left (rc 124 when cut off)
bounded() { local t=$(($(left) - $1)); shift; if [ "$t" -lt 5 ]; then return 124; fi; timeout -k 5 "$t" "$@"; }
# pack NAME TAR-ARGS...: $PACK/NAME written beside and renamed, or cut into NAME.00, NAME.01, ... if over SPLIT_MB
pack() {
  local name=$1 tmp; shift; tmp=$(mktemp -d "$PACK/.pack.XXXX")
  tar -cf "$tmp/$name" "$@" || { rm -rf "$tmp"; return 1; }
  if [ "$(stat -c %s "$tmp/$name")" -gt $((SPLIT_MB * 1048576)) ]; then
    split -b "${SPLIT_MB}M" -d "$tmp/$name" "$tmp/$name." && rm "$tmp/$name"
  fi
  mv "$tmp"/* "$PACK/" && rmdir "$tmp"
}
# latest DIR: its newest checkpoint-N folder (empty when none)
latest() { ls -d "$1"/checkpoint-* 2>/dev/null | sort -t- -k2 -n | tail -1; }
