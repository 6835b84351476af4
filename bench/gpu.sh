#!/usr/bin/env bash
# The GPU benchmarks on a machine with no package index: wheels carried in .whl/ or .wheels/ (bench/README.md),
# and, where the image has none, the nginx binary as .whl/nginx (the SuperLink's Fleet-only proxy).
#   bash bench/gpu.sh sweep       # speed variants, one process, model loaded once
#   bash bench/gpu.sh rounds      # whole SuperNode rounds: fresh ClientApp processes, naive and warm trainer
#   bash bench/gpu.sh federation  # the whole federation (bench/federation.py): TLS SuperLink + auth,
#                                 # 2 SuperNodes with warm trainers, flwr run; FED_RUNS, FED_ROUNDS, FED_ARGS
#   bash bench/gpu.sh adapter-hop # the warm trainer's adapter in/out of the model alone (bench/adapter_hop.py)
#   bash bench/gpu.sh compile-cache # 2 fresh trainer processes sharing a compile cache: does round 1 recompile?
#                                   # (CC_PYSPY=HZ: profiled with py-spy, bench/pyspy_top.py sums it up)
#   bash bench/gpu.sh smoke       # versions + the model: check the install, nothing else
# Results: $OUT (or bench/out/results), the model and data in $BENCH_WORK (default /tmp/fedtune-bench).
set -uo pipefail
export PYTHONUNBUFFERED=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 HF_HUB_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
RESULTS=${OUT:-bench/out/results}
WORK=${BENCH_WORK:-/tmp/fedtune-bench}
mkdir -p "$RESULTS"
WHEELS=$(ls .whl/*.whl .wheels/*.whl 2>/dev/null)
if [ -n "$WHEELS" ] && [ ! -f /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $WHEELS \
    || exit 1
  touch /tmp/site/.installed
fi
if [ -d /tmp/site ]; then
  export PYTHONPATH=/tmp/site:$PWD
  # console scripts (flower-supernode, flwr, flwr-clientapp, ...) next to python3: fedtune finds them there
  PYBIN=$(python3 -c 'import os, sys; print(os.path.dirname(sys.executable))')
  for f in /tmp/site/bin/*; do ln -sf "$f" "$PYBIN/" 2>/dev/null; done
  mkdir -p /tmp/site-bin && export PATH=$PYBIN:/tmp/site-bin:$PATH
else
  export PYTHONPATH=$PWD
fi
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ] && [ -f .whl/nginx ]; then
  install -m 0755 .whl/nginx /tmp/site-bin/nginx
fi
python3 - <<'PY' | tee "$RESULTS/versions.txt"
import platform, torch, transformers, peft, bitsandbytes, trl, datasets, flwr
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| transformers", transformers.__version__, "| peft", peft.__version__, "| bitsandbytes",
      bitsandbytes.__version__, "| trl", trl.__version__, "| datasets", datasets.__version__, "| flwr",
      flwr.__version__)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
from bench.federation import http_stack
print("http", http_stack())  # uvloop + httptools, as `pip install flwr` brings them (uvicorn[standard])
PY
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee -a "$RESULTS/versions.txt"
if [ ! -f "$WORK/shape.json" ]; then
  python3 -m bench.supernode_round prepare --out "$WORK" 2>&1 | grep -v -i "warn\|it/s\]" || exit 1
fi
for phase in "${@:-sweep}"; do
case "$phase" in
  sweep)
    python3 -m bench.supernode_round sweep --out "$WORK" --json "$RESULTS/sweep.json" \
      --profile-variant "${PROFILE_VARIANT:-pf4-nogc-bf16}" ${SWEEP_ARGS:-} 2>&1 \
      | grep -v -i "warn\|it/s\]\|examples/s\]\|^{'" | tee "$RESULTS/sweep.txt"
    # profiles/fast.toml must fit a 24 GB card on the worst-case batch; else checkpoint every 2nd layer
    python3 - "$RESULTS/sweep.json" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))["variants"].get("pf4-nogc-bf16-compile", {})
if v.get("fits_card_cap") is not True:
    print(f"fast profile: pf4-nogc-bf16-compile worst case {v.get('worst_case_peak_gib')} does not fit a 24 GB "
          "card: using gc every 2")
    text = open("profiles/fast.toml").read().replace(
        "model.gradient-checkpointing = false", "model.gradient-checkpointing-every = 2")
    open("profiles/fast.toml", "w").write(text)
PY
    ;;
  adapter-hop)  # the warm trainer's adapter in/out of the 4-bit model: peft each call vs fedtune's map
    python3 -m bench.adapter_hop --work "$WORK" --profile "${HOP_PROFILE:-reference}" \
      --json "$RESULTS/adapter-hop${FED_TAG:-}.json" 2>&1 | grep -v -i "warn\|it/s\]" | tee "$RESULTS/adapter-hop${FED_TAG:-}.txt"
    ;;
  compile-cache)  # CC_PROFILE (default fast), CC_PROCESSES (default 2), CC_ARGS (e.g. --cache DIR)
    # CC_PYSPY=HZ: every process sampled by py-spy (a carried wheel), summed up by bench/pyspy_top.py
    wrap=()
    [ -n "${CC_PYSPY:-}" ] && wrap=(py-spy record --subprocesses --rate "$CC_PYSPY" --format raw -o /tmp/cc-pyspy.raw --)
    "${wrap[@]}" python3 -m bench.compile_cache --work "$WORK" --profile "${CC_PROFILE:-fast}" --processes "${CC_PROCESSES:-2}" ${CC_ARGS:-} \
      --json "$RESULTS/compile-cache${FED_TAG:-}.json" 2>&1 | grep -v -i "warn\|it/s\]\|examples/s\]" \
      | tee "$RESULTS/compile-cache${FED_TAG:-}.txt"
    if [ -n "${CC_PYSPY:-}" ]; then
      python3 -m bench.pyspy_top /tmp/cc-pyspy.raw --top 40 > "$RESULTS/compile-cache-pyspy${FED_TAG:-}.txt"
      python3 -m bench.pyspy_top /tmp/cc-pyspy.raw --top 40 --min-share 0 --focus load_by_key_path \
        >> "$RESULTS/compile-cache-pyspy${FED_TAG:-}.txt"  # what loading the cached module costs
    fi
    ;;
  smoke)
    python3 -c "import flwr, bitsandbytes, trl; print('imports ok')" && command -v flower-superlink flwr nginx
    ;;
  federation)  # FED_RUNS="reference:packed,reference:per-tensor,fast:packed,fast:per-tensor", FED_ROUNDS=2
    # FED_HTTP=bare: uvicorn without uvloop and httptools (asyncio + h11), as in an image that lacks them
    if [ "${FED_HTTP:-}" = bare ]; then
      mkdir -p /tmp/bare-http/uvloop /tmp/bare-http/httptools
      for m in uvloop httptools; do echo 'raise ImportError("FED_HTTP=bare")' > /tmp/bare-http/$m/__init__.py; done
      export PYTHONPATH=/tmp/bare-http:$PYTHONPATH
    fi
    # FED_THREADS=1: the SuperLink's per-thread CPU every 0.1 s (bench/thread_cpu.py; --rounds sums it per round)
    if [ -n "${FED_THREADS:-}" ]; then
      python3 -m bench.thread_cpu --match superlink.flower_entry --interval 0.1 \
        --out "$RESULTS/superlink-threads${FED_TAG:-}.jsonl" > "$RESULTS/superlink-threads${FED_TAG:-}.txt" 2>&1 &
    fi
    # FED_PYSPY=DELAY:SECONDS: py-spy --gil on the SuperLink from DELAY s after the start, for SECONDS
    if [ -n "${FED_PYSPY:-}" ]; then
      ( sleep "${FED_PYSPY%%:*}"; pid=$(pgrep -f superlink.flower_entry | head -1)
        py-spy record --pid "$pid" --gil --nonblocking --rate 200 --duration "${FED_PYSPY##*:}" --format raw \
          -o /tmp/superlink-gil.raw >/dev/null 2>&1
        python3 -m bench.pyspy_top /tmp/superlink-gil.raw --top 45 > "$RESULTS/superlink-gil${FED_TAG:-}.txt" ) &
    fi
    python3 -m bench.federation --work "$WORK" --nodes "${FED_NODES:-2}" --rounds "${FED_ROUNDS:-2}" \
      --runs "${FED_RUNS:-reference:per-tensor,reference:packed}" --json "$RESULTS/federation${FED_TAG:-}.json" \
      ${FED_ARGS:-} 2>&1 | grep -v -i "warn\|it/s\]\|examples/s\]" | tee "$RESULTS/federation${FED_TAG:-}.txt"
    wait
    [ -n "${FED_THREADS:-}" ] && gzip -f "$RESULTS/superlink-threads${FED_TAG:-}.jsonl"
    ;;
  rounds)  # ROUND_MODES="naive warm" (default) or one of them; WARM_ROUNDS rounds per profile when warm
    for mode in ${ROUND_MODES:-naive warm}; do
      extra=""
      [ "$mode" = warm ] && extra="--preload --rounds ${WARM_ROUNDS:-1}"
      python3 -m bench.supernode_round rounds --out "$WORK" --mode "$mode" --profiles "${ROUND_PROFILES:-reference,fast}" \
        $extra --json "$RESULTS/rounds-$mode.json" 2>&1 | grep -v -i "warn\|it/s\]\|examples/s\]\|^{'" \
        | tee "$RESULTS/rounds-$mode.txt"
    done
    ;;
esac
done
