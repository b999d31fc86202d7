#!/usr/bin/env bash
# The OpenCV-dependent tests (RandAugment warps, JPEG decoding) at both ends of the range requirements.txt allows:
# the locked (newest) release in .venv, and the oldest release, put in front of it on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
VPY=.venv/bin/python
req=$(grep -m1 '^opencv-python-headless' requirements.txt)
oldest=$(echo "$req" | .venv/bin/uv pip compile - --resolution lowest --python-version 3.11 \
           --python-platform x86_64-manylinux_2_28 --no-header --no-annotate -q | grep '^opencv-python-headless==')
locked=$(grep -m1 '^opencv-python-headless==' requirements.lock)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$VPY -m pip install -q --no-deps --target "$tmp" "$oldest" 2>&1 | grep -v '^WARNING: Location' || true
for spec in "$locked" "$oldest"; do
  [ "$spec" = "$oldest" ] && export PYTHONPATH="$tmp"
  got=$($VPY -c 'import cv2; print(cv2.__version__)')
  echo "opencv bounds: $spec (cv2 $got; requirements.txt: $req)"
  [ "${spec#*==}" = "$got" ] || [[ "${spec#*==}" == "$got".* ]] || { echo "expected $spec, imported $got" >&2; exit 1; }
  $VPY -m pytest tests/test_data_transforms.py -q -p no:cacheprovider
done
