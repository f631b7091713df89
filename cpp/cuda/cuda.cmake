# The CUDA backend and its kernels (cpp/cuda/): a static library `upg_cuda`, built when CMake finds a CUDA
# compiler (UPG_CUDA defaults to ON then, OFF otherwise, so `pip install .` without nvcc still
# builds). Include from the top-level CMakeLists.txt after project(); link the consumer with
# `target_link_libraries(<target> PRIVATE upg_cuda)`; it defines UPG_CUDA=1 for its users.
# Machine code for sm_80, 86, 89, 90 (and 100, 120 where nvcc has them), plus PTX of the newest
# for later GPUs.
include(CheckLanguage)
check_language(CUDA)
if(CMAKE_CUDA_COMPILER)
  set(UPG_CUDA_DEFAULT ON)
else()
  set(UPG_CUDA_DEFAULT OFF)
endif()
option(UPG_CUDA "Build the CUDA kernels (cpp/cuda)" ${UPG_CUDA_DEFAULT})

if(UPG_CUDA)
  if(NOT CMAKE_CUDA_COMPILER)
    message(FATAL_ERROR "UPG_CUDA is ON but no CUDA compiler was found (set CMAKE_CUDA_COMPILER)")
  endif()
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES OFF)  # per-target below; keeps enable_language from picking one
  endif()
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  set(UPG_CUDA_ARCHS 80-real 86-real 89-real 90-real)
  set(UPG_CUDA_PTX 90-virtual)
  if(CMAKE_CUDA_COMPILER_VERSION VERSION_GREATER_EQUAL 12.8)
    list(APPEND UPG_CUDA_ARCHS 100-real 120-real)
    set(UPG_CUDA_PTX 120-virtual)
  endif()
  if(CMAKE_CUDA_ARCHITECTURES)  # an explicit -DCMAKE_CUDA_ARCHITECTURES=... wins
    set(UPG_CUDA_ARCHS ${CMAKE_CUDA_ARCHITECTURES})
    set(UPG_CUDA_PTX)
  endif()
  add_library(upg_cuda STATIC
    ${CMAKE_CURRENT_LIST_DIR}/backend.cu
    ${CMAKE_CURRENT_LIST_DIR}/bandwidth.cu
    ${CMAKE_CURRENT_LIST_DIR}/host.cu
    ${CMAKE_CURRENT_LIST_DIR}/matvec.cu
    ${CMAKE_CURRENT_LIST_DIR}/matmul.cu
    ${CMAKE_CURRENT_LIST_DIR}/attention.cu
    ${CMAKE_CURRENT_LIST_DIR}/rms_norm.cu
    ${CMAKE_CURRENT_LIST_DIR}/rope.cu
    ${CMAKE_CURRENT_LIST_DIR}/elementwise.cu
    ${CMAKE_CURRENT_LIST_DIR}/get_rows.cu
    ${CMAKE_CURRENT_LIST_DIR}/top_k.cu)
  set_target_properties(upg_cuda PROPERTIES
    CUDA_ARCHITECTURES "${UPG_CUDA_ARCHS};${UPG_CUDA_PTX}"
    CUDA_STANDARD 17
    CUDA_STANDARD_REQUIRED ON
    POSITION_INDEPENDENT_CODE ON)
  # cpp/upg/upg_common.h: the argument structs every backend shares.
  target_include_directories(upg_cuda PUBLIC ${CMAKE_CURRENT_LIST_DIR} ${CMAKE_CURRENT_LIST_DIR}/..)
  target_link_libraries(upg_cuda PUBLIC CUDA::cudart_static)
  target_compile_definitions(upg_cuda PUBLIC UPG_CUDA=1)
endif()
