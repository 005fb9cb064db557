#!/usr/bin/env bash
# Run HERE (a machine with pip's registry), before a GPU session: the GPU machine has no network.
# Fills .gpu/ in the repository root (a folder git ignores: its own .gitignore says *) with what
# benchmarks/gpu_session.sh needs there and its image lacks:
#   .gpu/wheels/   pythae, hydra-core, omegaconf and their missing needs, as wheels for CPython 3.12
#                  (the GPU image's python3; torch, torchvision, numpy, scipy, scikit-learn, seaborn,
#                  tqdm, imageio, cloudpickle, tensorboard and pytest are already there)
#   .gpu/data/MNIST/raw/*.gz   the four MNIST IDX files, compressed (11.6 MB; gunzipped there)
# Then call the device tool with carry [".gpu"] and the command gpu_session.sh's header gives.
#
#   bash benchmarks/gpu_prepare.sh [DATA_ROOT]      # DATA_ROOT: the folder holding MNIST/raw
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
data_root="${1:-${VAE_LAB_DATA:-../shared/data}}"

rm -rf .gpu && mkdir -p .gpu/wheels .gpu/data/MNIST/raw
echo '*' > .gpu/.gitignore  # the folder ignores itself: never committed, travels only when carried

# Pure-Python wheels and binary ones, one version each (two versions of a name stop the install there).
# The versions are those this project is developed and tested with.
wheels=(
    pythae==0.1.2 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
    typing-extensions==4.15.0 hydra-core==1.3.8 omegaconf==2.3.1 mlxtend==0.25.0
)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .gpu/wheels "${wheels[@]}"
# antlr4-python3-runtime 4.9.3 (what omegaconf 2.3 pins) exists only as a source archive: build its
# pure-Python wheel here; it installs on any CPython 3.
python3 -m pip wheel --quiet --no-deps --no-build-isolation -w .gpu/wheels antlr4-python3-runtime==4.9.3

for name in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    if [[ -f "$data_root/MNIST/raw/$name.gz" ]]; then
        cp "$data_root/MNIST/raw/$name.gz" .gpu/data/MNIST/raw/
    else
        gzip -c "$data_root/MNIST/raw/$name" > ".gpu/data/MNIST/raw/$name.gz"
    fi
done
ls -l .gpu/wheels
du -sh .gpu
echo "Ready: carry [\".gpu\"] and run: bash benchmarks/gpu_session.sh all"
