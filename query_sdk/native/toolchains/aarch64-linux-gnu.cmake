# Cross build for 64-bit Arm Linux with Debian's cross compiler (g++-aarch64-linux-gnu) and
# arm64 multiarch libraries (libsodium-dev:arm64, zlib1g-dev:arm64). The binaries run under
# qemu-user: qemu-aarch64 -L /usr/aarch64-linux-gnu ./cmce-query-native ...
#   cmake -S query_sdk/native -B build/aarch64 -G Ninja \
#     -DCMAKE_TOOLCHAIN_FILE=query_sdk/native/toolchains/aarch64-linux-gnu.cmake \
#     -DCMCE_HNSWLIB_INCLUDE=... -DCMCE_NATIVE_ARCH=OFF
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_LIBRARY_ARCHITECTURE aarch64-linux-gnu)
# the target's libraries from multiarch; headers without an arch (nlohmann-json) from /usr/include
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu /usr/lib/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE BOTH)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64 -L /usr/aarch64-linux-gnu)
