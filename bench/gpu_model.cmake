# The device model's training-step benchmark on the 512m preset (learner/cuda/cuda_model.h).
# Run on a GPU (bench/gpu_check.sh runs it with its defaults):
#   build/bench/gpu_train_step [B T [steps]]   markdown table for bench/RESULTS.md
if(TARGET quillan_cuda)
    add_executable(gpu_train_step ${CMAKE_CURRENT_LIST_DIR}/gpu_train_step.cu)
    target_link_libraries(gpu_train_step PRIVATE quillan_cuda quillan_cuda_warnings)
    set_target_properties(gpu_train_step PROPERTIES CUDA_ARCHITECTURES
                                                    "${QUILLAN_CUDA_ARCHITECTURES}")
endif()
