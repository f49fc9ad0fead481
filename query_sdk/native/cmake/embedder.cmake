# The model runtime of libcmce_query (included by ../CMakeLists.txt after cmce_core): the static
# target cmce_embedder = image decode (src/image.cpp: stb_image for PNG, libjpeg-turbo for JPEG)
# + the bundle's .pte on the ExecuTorch C++ runtime with the XNNPACK delegate (src/embedder.cpp).
#
# ExecuTorch comes from the executorch wheel (its lib/*.so, include/ and CMake package; no
# torch): set executorch_DIR to its lib/cmake/executorch (a cross build points it at the
# target's wheel), or leave it unset to ask CMCE_PYTHON where the host's wheel is.
set(CMCE_PYTHON "" CACHE FILEPATH "Python whose executorch wheel to link (default: python3 on PATH)")
if(NOT executorch_DIR)
  set(_cmce_python "${CMCE_PYTHON}")
  if(NOT _cmce_python)
    find_program(_cmce_python NAMES python3 python REQUIRED)
  endif()
  execute_process(
    COMMAND "${_cmce_python}" -c
            "import importlib.util as u; print(u.find_spec('executorch').submodule_search_locations[0])"
    OUTPUT_VARIABLE _cmce_et_root OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _cmce_et_rc)
  if(NOT _cmce_et_rc EQUAL 0)
    message(FATAL_ERROR "cmake/embedder.cmake: ${_cmce_python} has no executorch package "
                        "(pip install executorch==1.5.1, or -Dexecutorch_DIR=<wheel>/lib/cmake/executorch)")
  endif()
  set(executorch_DIR "${_cmce_et_root}/lib/cmake/executorch")
endif()
find_package(executorch CONFIG REQUIRED COMPONENTS backend_xnnpack kernels_optimized threadpool)
find_package(JPEG REQUIRED)
find_path(STB_IMAGE_INCLUDE stb/stb_image.h REQUIRED)  # Debian libstb-dev

add_library(cmce_embedder STATIC src/image.cpp src/embedder.cpp)
target_include_directories(cmce_embedder PUBLIC src)
target_include_directories(cmce_embedder SYSTEM PRIVATE "${STB_IMAGE_INCLUDE}")
# Pillow's resampling coefficients are doubles computed without fused multiply-adds: so are ours.
target_compile_options(cmce_embedder PRIVATE -ffp-contract=off)
# cmce-export's int8 programs quantize inside the XNNPACK delegate: no quantized kernels needed.
target_link_libraries(cmce_embedder
  PUBLIC cmce_core
  PRIVATE JPEG::JPEG executorch::runtime executorch::kernels_optimized executorch::backend_xnnpack
          executorch::threadpool)

# the driver tests/test_native_embed.py compares with the Python SDK
add_executable(embed_probe tests/embed_probe.cpp)
target_link_libraries(embed_probe PRIVATE cmce_embedder)
