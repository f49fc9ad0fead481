#!/usr/bin/env bash
# Debian packages the native SDK's build and tests use (run as root): libsodium (Ed25519),
# nlohmann-json, stb (PNG/JPEG); clang + its runtime for the ASan/UBSan and libFuzzer build;
# a JDK for the JNI test; the aarch64 cross compiler, its libsodium/zlib and qemu-user for the
# aarch64 run. CMake >= 3.28 and ninja come from PyPI (the `dev` extra).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
apt-get update -qq
packages=(libsodium-dev nlohmann-json3-dev libstb-dev zlib1g-dev libjpeg62-turbo-dev clang libclang-rt-dev
          g++-aarch64-linux-gnu qemu-user libsodium-dev:arm64 zlib1g-dev:arm64
          libjpeg62-turbo-dev:arm64)
command -v javac >/dev/null || packages+=(default-jdk-headless)
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
