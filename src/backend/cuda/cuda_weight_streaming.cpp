// Weight streaming on a second stream. Every upload first waits on an event recorded on the compute stream at the
// time of the call, so it cannot overwrite a buffer that earlier blocks still read; its completion is an event that
// the compute stream waits on before the block that reads it. Inside a recording the same calls fork the copy
// stream off the capture and join it back, so a replayed step streams its blocks exactly as the eager one did.
#include "backend/cuda/cuda_backend.h"

namespace fluxswap::cuda {

struct CopyQueue {
  cudaStream_t stream = nullptr;
  cudaEvent_t issued[Backend::kStreamBuffers] = {};  // compute-stream work before the upload into buffer i
  cudaEvent_t ready[Backend::kStreamBuffers] = {};   // the upload into buffer i is done
  ~CopyQueue() {
    if (stream) cudaStreamSynchronize(stream), cudaStreamDestroy(stream);
    for (int i = 0; i < Backend::kStreamBuffers; ++i) {
      if (issued[i]) cudaEventDestroy(issued[i]);
      if (ready[i]) cudaEventDestroy(ready[i]);
    }
  }
};

void CudaBackend::stream_upload(const Tensor& host_src, const Tensor& device_dst, int buffer) {
  const char* op = "stream_upload";
  if (buffer < 0 || buffer >= kStreamBuffers)
    bad(op, "buffer " + std::to_string(buffer) + " is not in 0.." + std::to_string(kStreamBuffers - 1));
  if (host_src.device() != Device::CPU || device_dst.device() != Device::CUDA) bad(op, "host source, device destination");
  if (!host_src.is_contiguous() || !device_dst.is_contiguous()) bad(op, "both sides must be contiguous");
  if (host_src.nbytes() != device_dst.nbytes())
    bad(op, std::to_string(host_src.nbytes()) + " host bytes into a " + std::to_string(device_dst.nbytes()) +
                "-byte device buffer");
  // An asynchronous copy from pageable memory would be staged synchronously, and cannot be recorded at all.
  if (!pinned_->contains(host_src.data(), host_src.nbytes()))
    bad(op, "the host source must be pinned memory from host_buffer_allocator()");
  if (!copy_queue_) {
    auto q = std::make_shared<CopyQueue>();
    check(cudaStreamCreateWithFlags(&q->stream, cudaStreamNonBlocking), op, "cudaStreamCreateWithFlags");
    for (int i = 0; i < kStreamBuffers; ++i) {
      check(cudaEventCreateWithFlags(&q->issued[i], cudaEventDisableTiming), op, "cudaEventCreateWithFlags");
      check(cudaEventCreateWithFlags(&q->ready[i], cudaEventDisableTiming), op, "cudaEventCreateWithFlags");
    }
    copy_queue_ = std::move(q);
  }
  CopyQueue& q = *copy_queue_;
  check(cudaEventRecord(q.issued[buffer], stream()), op, "cudaEventRecord");
  check(cudaStreamWaitEvent(q.stream, q.issued[buffer], 0), op, "cudaStreamWaitEvent");
  check(cudaMemcpyAsync(device_dst.data(), host_src.data(), host_src.nbytes(), cudaMemcpyHostToDevice, q.stream), op,
        "cudaMemcpyAsync");
  check(cudaEventRecord(q.ready[buffer], q.stream), op, "cudaEventRecord");
}

void CudaBackend::wait_stream_upload(int buffer) {
  const char* op = "wait_stream_upload";
  if (buffer < 0 || buffer >= kStreamBuffers)
    bad(op, "buffer " + std::to_string(buffer) + " is not in 0.." + std::to_string(kStreamBuffers - 1));
  if (!copy_queue_) bad(op, "nothing was uploaded");
  check(cudaStreamWaitEvent(stream(), copy_queue_->ready[buffer], 0), op, "cudaStreamWaitEvent");
}

}  // namespace fluxswap::cuda
