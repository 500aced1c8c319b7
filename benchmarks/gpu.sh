#!/usr/bin/env bash
# Every benchmark's GPU run as one command (issue 8, item 5), JSON into $OUT:
#   make install && bash benchmarks/gpu.sh            # ~6 min on an H100 before the end-to-end runs (not yet timed)
# Needs the bench extra (torch-lucent) for peers.py: `make install` includes it.
# DEVICE=cpu QUICK=--quick bash benchmarks/gpu.sh: the same commands in seconds (run by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/results/gpu}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-}
mkdir -p "$OUT"
if [ "$DEVICE" = cuda ]; then
  $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)"
fi
$PY benchmarks/variants.py --device $DEVICE $QUICK --out "$OUT/variants.json"
$PY benchmarks/hardware_limit.py --device $DEVICE $QUICK --units 32 --chains 32 --out "$OUT/hardware_limit_digits_conv2.json"
$PY benchmarks/hardware_limit.py --device $DEVICE $QUICK --model torchvision:resnet18 --size 224 --layer layer3 --units 32 \
    --chains 8 --steps 20 --out "$OUT/hardware_limit_resnet18_224_layer3.json"
$PY benchmarks/batching.py --device $DEVICE $QUICK --units 32 --out "$OUT/batching_digits_conv2.json"
$PY benchmarks/batching.py --device $DEVICE $QUICK --model torchvision:resnet18 --size 64 --layer layer2 --steps 10 --units 32 \
    --chains 4 --repeats 1 --out "$OUT/batching_resnet18_64_layer2.json"
$PY benchmarks/peers.py --device $DEVICE $QUICK --units 128 --a-units 8 --block 64 --out "$OUT/peers.json"
$PY benchmarks/scaling.py --device $DEVICE $QUICK --out "$OUT/scaling.json"
# vision transformers: vit_b_16 @224 MLP neurons of block 5 (random weights), 64 units x 8 chains x 100 steps
$PY benchmarks/vit.py --device $DEVICE $QUICK --units 64 --chains 8 --steps 100 --out "$OUT/vit.json"
# the GPU-first sweep issue: `ldam-sweep run` vs the in-process sampler, ResNet-18 random weights @224,
# layer3 units 0-127, 8 chains x 100 steps, lambda 0, 1 actor; block_size auto (batches sized to the GPU) vs 32
for BLOCK in auto 32; do
  $PY benchmarks/end_to_end.py --device $DEVICE $QUICK --model torchvision:resnet18 --input 224 --layers layer3 \
      --units 0-127 --steps 100 --chains 8 --actors 1 --block $BLOCK --out "$OUT/end_to_end_resnet18_224_layer3_$BLOCK.json"
  $PY benchmarks/end_to_end.py --device $DEVICE $QUICK --steps 300 --actors 1 --block $BLOCK \
      --out "$OUT/end_to_end_digits_$BLOCK.json"
done
$PY benchmarks/end_to_end.py --device $DEVICE $QUICK --model torchvision:resnet18 --input 224 --layers layer3 \
    --units 0-127 --steps 100 --chains 8 --actors 1 --block auto --nondeterministic \
    --out "$OUT/end_to_end_resnet18_224_layer3_auto_nondeterministic.json"
$PY benchmarks/pipeline.py $QUICK --model torchvision:resnet18 --input 224 --layer layer3 --blocks 4 --block 32 \
    --steps 100 --out "$OUT/pipeline_resnet18_224_layer3.json"
echo "all GPU results in $OUT"
