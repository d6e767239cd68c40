# The device model's training-step benchmark on the 512m preset (learner/cuda/cuda_model.h).
# It links every kernel of quillan_cuda, so it joins the build once the MoE and diffusion
# kernels have landed (the library adds its sources the same way). Run on a GPU (bench/gpu_check.sh):
#   build/bench/gpu_train_step [B T [steps]]   markdown table for bench/RESULTS.md
set(QUILLAN_CUDA_DIR ${CMAKE_SOURCE_DIR}/learner/cuda)
if(TARGET quillan_cuda AND EXISTS ${QUILLAN_CUDA_DIR}/cuda_moe.cu
   AND EXISTS ${QUILLAN_CUDA_DIR}/cuda_diffusion.cu)
    add_executable(gpu_train_step ${CMAKE_CURRENT_LIST_DIR}/gpu_train_step.cu)
    target_link_libraries(gpu_train_step PRIVATE quillan_cuda quillan_cuda_warnings)
    set_target_properties(gpu_train_step PROPERTIES CUDA_ARCHITECTURES "75;80;90")
endif()
