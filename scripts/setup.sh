#!/usr/bin/env bash
# One-shot set-up: system Vulkan driver (only where the machine needs one), a virtual
# environment in .venv, and flowmanip installed into it (editable). Safe to run twice.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FLOWMANIP_VENV:-.venv}
PYTHON=${PYTHON:-python3}

log() { printf '[setup] %s\n' "$*"; }

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# --- Vulkan ------------------------------------------------------------------------
# SAPIEN (ManiSkill's simulator) needs a Vulkan device even for state observations.
# NVIDIA machines bring their own ICD; CPU machines need Mesa's lavapipe >= 24.3
# (older lavapipe lacks VK_KHR_external_semaphore_fd).
have_nvidia_icd() {
  ls /usr/share/vulkan/icd.d/nvidia_icd*.json /etc/vulkan/icd.d/nvidia_icd*.json \
     /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd*.json >/dev/null 2>&1
}
mesa_version() { dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null || true; }
mesa_ok() {
  local v; v=$(mesa_version)
  [ -n "$v" ] && dpkg --compare-versions "$v" ge 24.3 && ldconfig -p | grep -q libvulkan.so.1
}
install_vulkan() {
  if have_nvidia_icd; then log "NVIDIA Vulkan ICD found; no Mesa driver needed"; return; fi
  if mesa_ok; then log "Mesa Vulkan driver $(mesa_version) already installed"; return; fi
  if ! command -v apt-get >/dev/null 2>&1; then
    log "no apt-get: install Mesa >= 24.3 (mesa-vulkan-drivers) and libvulkan1 yourself"; return
  fi
  . /etc/os-release
  if [ "${ID:-}" = debian ] && [ "${VERSION_CODENAME:-}" = bookworm ]; then
    # Debian 12 ships Mesa 22.3, too old; bookworm-backports has 25.x.
    local src=/etc/apt/sources.list.d/debian.sources
    if [ -f "$src" ] && ! grep -q 'bookworm-backports' "$src"; then
      log "enabling bookworm-backports in $src"
      sudo_if_needed sed -i 's/^Suites: bookworm bookworm-updates$/Suites: bookworm bookworm-updates bookworm-backports/' "$src"
    fi
    sudo_if_needed apt-get update -qq
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers libvulkan1
  else
    sudo_if_needed apt-get update -qq
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mesa-vulkan-drivers libvulkan1
  fi
  log "Mesa Vulkan driver $(mesa_version) installed"
}

# --- Python ------------------------------------------------------------------------
install_python() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # numpy<2 in the same resolve: mplib 0.1.1 (ManiSkill's motion planner) segfaults with numpy 2.
  log "installing flowmanip and its dependencies (a few minutes on a fresh machine)"
  "$VENV/bin/python" -m pip install -q -e '.[dev]'
  "$VENV/bin/python" -m pip check || log "pip check reported conflicts (see above)"
}

install_vulkan
install_python
log "done: activate with 'source $VENV/bin/activate'"
