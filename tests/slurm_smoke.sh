#!/usr/bin/env bash
# CI's Slurm smoke test (.ci/run, after `make test`): slurm/pretrain.sbatch runs a short job on both nodes of a local
# Slurm cluster (tests/test_slurm_pretrain.py::test_a_short_job_completes, ~30 s). The cluster's daemons run as
# root, and Slurm may have to be installed first (Debian's slurm-wlm and munge). Without root or passwordless sudo,
# or without apt-get, the test is skipped and this says why; once Slurm is there, a job that fails fails CI.
set -euo pipefail
cd "$(dirname "$0")/.."

skip() {
    echo "Slurm smoke test skipped: $1"
    exit 0
}

if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    skip "the local Slurm cluster runs its daemons as root, and this is user $(id -un) without passwordless sudo"
fi

PATH=$PATH:/usr/sbin:/sbin  # the daemons' directory, which a non-login PATH may lack
if ! command -v sbatch >/dev/null || ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || skip "Slurm is not installed, and there is no apt-get to install it"
    echo "installing Slurm for the smoke test: apt-get install slurm-wlm munge"
    if ! { "${as_root[@]}" apt-get update -qq &&
           "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; } >/dev/null; then
        skip "apt-get could not install slurm-wlm and munge (its errors are above)"
    fi
fi

# As root, so no cache or bytecode is left behind that the checkout's owner could not remove.
"${as_root[@]}" env PYTHONDONTWRITEBYTECODE=1 .venv/bin/python -m pytest -q -p no:cacheprovider \
    tests/test_slurm_pretrain.py::test_a_short_job_completes
