#!/usr/bin/env bash
# Every benchmark's GPU run as one command (issue 8, item 5), JSON into $OUT:
#   make install && bash benchmarks/gpu.sh
# Without an installed venv (a GPU machine with no package index; wheels from ../shared-style wheels.sh):
#   PY=python3 PYTHONPATH=/tmp/site:$PWD bash benchmarks/gpu.sh
# The runs go in order of what the GPU issue must show (end-to-end efficiency and units/s, the steady-state
# ratio at 224 px, digits auto vs 32, the cost of determinism), so a session cut short keeps the key numbers.
# A benchmark that fails is reported and the rest still run; the exit status says whether any failed.
# Needs the bench extra (torch-lucent) for peers.py: `make install` includes it.
# DEVICE=cpu QUICK=--quick bash benchmarks/gpu.sh: the same commands in seconds (run by the tests).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/results/gpu}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-}
mkdir -p "$OUT"
if [ "$DEVICE" = cuda ]; then
  $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)" || exit 1
fi
failed=()
bench() {  # bench NAME SCRIPT ARGS...: run one benchmark, keep going if it fails
  local name=$1; shift
  echo "== $name ($(date +%T))"
  $PY "$@" || { failed+=("$name"); echo "!! $name failed"; }
}
# the GPU-first sweep issue: `ldam-sweep run` vs the in-process sampler, ResNet-18 random weights @224,
# layer3 units 0-127, 8 chains x 100 steps, lambda 0, 1 actor; block_size auto (batches sized to the GPU) vs 32
R18=(--model torchvision:resnet18 --input 224 --layers layer3 --units 0-127 --steps 100 --chains 8 --actors 1)
bench e2e_r18_auto benchmarks/end_to_end.py --device $DEVICE $QUICK "${R18[@]}" --block auto \
    --out "$OUT/end_to_end_resnet18_224_layer3_auto.json"
bench hwlimit_r18 benchmarks/hardware_limit.py --device $DEVICE $QUICK --model torchvision:resnet18 --size 224 \
    --layer layer3 --units 32 --chains 8 --steps 20 --out "$OUT/hardware_limit_resnet18_224_layer3.json"
# the realism defaults' cost per step (exemplar starts, spectrum preconditioner, target) over revision 2's, at lambda 0.5
bench hwlimit_r18_realism benchmarks/hardware_limit.py --device $DEVICE $QUICK --model torchvision:resnet18 --size 224 \
    --layer layer3 --units 32 --chains 8 --steps 20 --data --baseline revision2 \
    --out "$OUT/hardware_limit_resnet18_224_layer3_realism.json"
# a unit's samples: the same batch again, alone, in another batch of the same size; what determinism costs
bench repro_r18 benchmarks/reproducibility.py --device $DEVICE $QUICK --model torchvision:resnet18 --size 224 \
    --layer layer3 --out "$OUT/reproducibility_resnet18_224_layer3.json"
bench repro_digits benchmarks/reproducibility.py --device $DEVICE $QUICK --out "$OUT/reproducibility_digits_fc1.json"
for BLOCK in auto 32; do
  bench e2e_digits_$BLOCK benchmarks/end_to_end.py --device $DEVICE $QUICK --steps 300 --actors 1 --block $BLOCK \
      --out "$OUT/end_to_end_digits_$BLOCK.json"
done
bench e2e_r18_32 benchmarks/end_to_end.py --device $DEVICE $QUICK "${R18[@]}" --block 32 \
    --out "$OUT/end_to_end_resnet18_224_layer3_32.json"
bench e2e_r18_auto_nondet benchmarks/end_to_end.py --device $DEVICE $QUICK "${R18[@]}" --block auto --nondeterministic \
    --out "$OUT/end_to_end_resnet18_224_layer3_auto_nondeterministic.json"
bench pipeline benchmarks/pipeline.py $QUICK --model torchvision:resnet18 --input 224 --layer layer3 --blocks 4 \
    --block 32 --steps 100 --out "$OUT/pipeline_resnet18_224_layer3.json"
bench scaling benchmarks/scaling.py --device $DEVICE $QUICK --out "$OUT/scaling.json"
bench hwlimit_digits benchmarks/hardware_limit.py --device $DEVICE $QUICK --units 32 --chains 32 \
    --out "$OUT/hardware_limit_digits_conv2.json"
bench variants benchmarks/variants.py --device $DEVICE $QUICK --out "$OUT/variants.json"
bench batching_digits benchmarks/batching.py --device $DEVICE $QUICK --units 32 --out "$OUT/batching_digits_conv2.json"
bench batching_r18 benchmarks/batching.py --device $DEVICE $QUICK --model torchvision:resnet18 --size 64 --layer layer2 \
    --steps 10 --units 32 --chains 4 --repeats 1 --out "$OUT/batching_resnet18_64_layer2.json"
# vision transformers: vit_b_16 @224 MLP neurons of block 5 (random weights), 64 units x 8 chains x 100 steps
bench vit benchmarks/vit.py --device $DEVICE $QUICK --units 64 --chains 8 --steps 100 --out "$OUT/vit.json"
bench peers benchmarks/peers.py --device $DEVICE $QUICK --units 128 --a-units 8 --block 64 --out "$OUT/peers.json"
echo "results in $OUT ($(date +%T))"
if [ ${#failed[@]} -gt 0 ]; then echo "failed: ${failed[*]}"; exit 1; fi
