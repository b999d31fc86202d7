#!/usr/bin/env bash
# Install what a throw-away local SLURM cluster needs (Debian/Ubuntu, as root):
#   slurmctld, slurmd, the client commands (sbatch, srun, scontrol, ...) and munge.
#
#   sudo slurm/local/install.sh            # idempotent: does nothing when everything is there
#
# Only the four packages, without recommends (the slurm-wlm metapackage with recommends pulls ~43 packages).
# Exit codes: 0 installed (or already present), 3 not root, 4 no apt-get, 1 anything else.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)
COMMANDS=(slurmctld slurmd sbatch srun scontrol squeue sinfo scancel munged munge unmunge)

die() { echo "install.sh: error: $2" >&2; exit "$1"; }

missing=()
for c in "${COMMANDS[@]}"; do
    command -v "$c" >/dev/null 2>&1 || [[ -x /usr/sbin/$c ]] || missing+=("$c")
done

if (( ${#missing[@]} == 0 )) && [[ -s /etc/munge/munge.key ]]; then
    echo "install.sh: SLURM and munge are already installed ($(slurmctld -V 2>/dev/null || echo '?'))"
    exit 0
fi

if (( ${#missing[@]} )); then
    echo "install.sh: missing commands: ${missing[*]}"
    (( EUID == 0 )) || die 3 "installing Debian packages needs root (run: sudo $0)"
    command -v apt-get >/dev/null 2>&1 || die 4 "no apt-get on this machine: install ${PACKAGES[*]} with your package manager"
    export DEBIAN_FRONTEND=noninteractive
    echo "install.sh: apt-get install --no-install-recommends ${PACKAGES[*]}"
    apt-get update -qq
    # The packages try to start their services through invoke-rc.d; without an init system that is refused
    # (harmless "policy-rc.d denied execution" lines). slurm/local/start.sh starts the daemons itself.
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"
fi

# The munge package creates /etc/munge/munge.key in its postinst; recreate it if someone removed it.
if [[ ! -s /etc/munge/munge.key ]]; then
    (( EUID == 0 )) || die 3 "/etc/munge/munge.key is missing and creating it needs root"
    install -d -o munge -g munge -m 0700 /etc/munge
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0600 /etc/munge/munge.key
fi

for c in "${COMMANDS[@]}"; do
    command -v "$c" >/dev/null 2>&1 || [[ -x /usr/sbin/$c ]] || die 1 "$c is still missing after the install"
done
echo "install.sh: ready: $(slurmctld -V), $(munged -V 2>&1 | head -n 1)"
