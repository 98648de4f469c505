#!/usr/bin/env bash
# The torch floor, checked: install kdcli with one torch/torchvision pair in its own virtual
# environment and run the test suite against it (the non-slow tests, then the shipping chain:
# distill, prune, export, quantize, evaluate).
#
#   bash scripts/check_torch.sh 2.6.0 0.21.0            # -> .venv-torch-2.6.0, exit status of pytest
#   bash scripts/check_torch.sh 2.6.0 0.21.0 tests/test_formats.py   # chosen tests only
#
# pyproject.toml's torch>= floor is the oldest pair this passed with (README "Set-up").
set -euo pipefail
cd "$(dirname "$0")/.."
torch_v=${1:?torch version, e.g. 2.6.0}
vision_v=${2:?torchvision version, e.g. 0.21.0}
shift 2
env_dir=.venv-torch-$torch_v
python3 -m venv "$env_dir"
"$env_dir/bin/pip" install -q "torch==$torch_v" "torchvision==$vision_v"
# the rest as pinned for CI, except torch and torchvision
grep -v -E '^(torch|torchvision)==' .ci/constraints.txt > "$env_dir/constraints.txt"
"$env_dir/bin/pip" install -q -c "$env_dir/constraints.txt" -e '.[test]'
"$env_dir/bin/python" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
if [ $# -gt 0 ]; then
    exec "$env_dir/bin/pytest" -q -p no:cacheprovider "$@"
fi
"$env_dir/bin/pytest" -q -p no:cacheprovider -m "not slow"
exec "$env_dir/bin/pytest" -q -p no:cacheprovider tests/test_ship.py tests/test_quantize.py
