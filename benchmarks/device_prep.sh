#!/bin/bash
# What the device runs need beyond this repository, in two halves (WORKSPACE.md "The device (GPU)"):
#   bash benchmarks/device_prep.sh host     # here, once per checkout: .whl/ (grain, fla, ... wheels for the device's
#                                           # Python 3.12; ~15 MB) and .dev/pydocs_corpus.tar.gz (the English corpus
#                                           # of the quality runs: the Python 3.11 docs' 497 reST sources, ~3 MB)
#   source benchmarks/device_prep.sh device # on the device, in a call that carries [".whl", ".dev"]: installs the
#                                           # wheels into /tmp/site, sets PYTHONPATH, untars the corpus to /tmp/data
# .whl/, .dev/ and .madstate*/ (saved MAD slots) are ignored through .git/info/exclude (added here if missing).
set -uo pipefail
case "${1:-}" in
  host)
    for path in .whl/ .dev/ '.madstate*/'; do
      grep -qxF "$path" .git/info/exclude 2>/dev/null || echo "$path" >> .git/info/exclude
    done
    python=${PYTHON:-python3}  # any pip: the wheels are picked for 3.12 by --python-version
    mkdir -p .whl .dev
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .whl grain==0.2.18 array_record dm-tree portpicker \
      ml_collections tensorboardX cloudpickle tokenizers zstandard flash-linear-attention==0.6.0 fla-core==0.6.0
    if [ ! -f .dev/pydocs_corpus.tar.gz ]; then
      work=$(mktemp -d)
      (cd "$work" && apt-get download python3.11-doc > /dev/null && dpkg-deb -x python3.11-doc_*.deb x)
      mkdir -p "$work/corpus"
      find "$work/x" -path "*html/_sources*" -name "*.rst.txt" | while read -r f; do
        cp "$f" "$work/corpus/$(echo "$f" | sed 's#.*_sources/##; s#/#_#g')"
      done
      tar czf .dev/pydocs_corpus.tar.gz -C "$work" corpus
      rm -rf "$work"
    fi
    ls .whl | wc -l; du -sh .whl .dev/pydocs_corpus.tar.gz ;;
  device)
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
    export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
    if [ -f .dev/pydocs_corpus.tar.gz ]; then mkdir -p /tmp/data && tar xzf .dev/pydocs_corpus.tar.gz -C /tmp/data; fi
    nvidia-smi --query-gpu=name --format=csv,noheader ;;
  *)
    echo "usage: bash benchmarks/device_prep.sh host | source benchmarks/device_prep.sh device" >&2
    return 2 2>/dev/null || exit 2 ;;
esac
