# Sourced by the experiment scripts (needs OUT and PY): `run STAGE ARGS...` runs `infllmv2 STAGE ARGS...` offline,
# recording the command in $OUT/commands.txt and its wall time in $OUT/stage_times.txt.
run() {
  echo "+ infllmv2 $*" >> "$OUT/commands.txt"
  local t0=$SECONDS
  HF_HUB_OFFLINE=1 "$PY" -m infllmv2.cli "$@"
  echo "$(( SECONDS - t0 )) s  infllmv2 $1 ${3:-}" | tee -a "$OUT/stage_times.txt"
}
