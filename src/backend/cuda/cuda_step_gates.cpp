// Step gates and the side queue (Backend): a swap that runs under the next step fills a block's LoRA slots on the
// side stream and opens the block's gate; the recorded step waits at each block's gate, so it starts as soon as the
// first block's adapter is in instead of after the whole file.
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/step_gate_kernels.h"

namespace fluxswap::cuda {

struct StepGates {
  int count = 0;
  // uint32 [count + 2]: each gate's round, then the current round, then a word gate_timeline's clock reading sets
  std::shared_ptr<void> flags;
  // uint64 [2 * (count + 1) + 1]: device clock (ns) when the compute queue last passed each gate, then when each gate
  // (and the round: close_gates) was last set, then gate_timeline's clock reading
  std::shared_ptr<void> times;
  uint32_t round = 0;
  std::vector<std::shared_ptr<void>> retired;  // earlier flags, which recordings may still wait on
  cudaStream_t side = nullptr;
  cudaEvent_t fork = nullptr, join = nullptr;
  ~StepGates() {
    if (side) cudaStreamSynchronize(side), cudaStreamDestroy(side);
    if (fork) cudaEventDestroy(fork);
    if (join) cudaEventDestroy(join);
  }
  uint32_t* word(int i) const { return static_cast<uint32_t*>(flags.get()) + i; }
  uint64_t* passed(int i) const { return static_cast<uint64_t*>(times.get()) + i; }
  uint64_t* set_at(int i) const { return static_cast<uint64_t*>(times.get()) + count + 1 + i; }
  uint64_t* clock_reading() const { return static_cast<uint64_t*>(times.get()) + 2 * (count + 1); }
  size_t time_slots() const { return size_t(2 * (count + 1) + 1); }
};

void CudaBackend::prepare_gates(int count) {
  const char* op = "prepare_gates";
  if (count <= 0) bad(op, "need at least one gate, got " + std::to_string(count));
  if (!gates_) {
    auto g = std::make_shared<StepGates>();
    // The highest priority: the step waits for the fills issued here, so their blocks go before the step's own.
    int least = 0, greatest = 0;
    check(cudaDeviceGetStreamPriorityRange(&least, &greatest), op, "cudaDeviceGetStreamPriorityRange");
    check(cudaStreamCreateWithPriority(&g->side, cudaStreamNonBlocking, greatest), op, "cudaStreamCreateWithPriority");
    check(cudaEventCreateWithFlags(&g->fork, cudaEventDisableTiming), op, "cudaEventCreateWithFlags");
    check(cudaEventCreateWithFlags(&g->join, cudaEventDisableTiming), op, "cudaEventCreateWithFlags");
    gates_ = std::move(g);
  }
  if (gates_->count >= count) return;
  if (capturing_) bad(op, "gates must be prepared before recording");
  if (gates_->flags) gates_->retired.push_back(gates_->flags), gates_->retired.push_back(gates_->times);
  gates_->flags = memory_.allocate(size_t(count + 2) * sizeof(uint32_t), "step gates");
  gates_->times = memory_.allocate(size_t(2 * (count + 1) + 1) * sizeof(uint64_t), "step gate times");
  check(cudaMemsetAsync(gates_->times.get(), 0, size_t(2 * (count + 1) + 1) * sizeof(uint64_t), stream()), op,
        "cudaMemsetAsync");
  // Every gate at the current round: open.
  std::vector<uint32_t> init(size_t(count + 2), gates_->round);
  check(cudaMemcpyAsync(gates_->flags.get(), init.data(), init.size() * sizeof(uint32_t), cudaMemcpyHostToDevice,
                        stream()),
        op, "cudaMemcpyAsync");
  check(cudaStreamSynchronize(stream()), op, "cudaStreamSynchronize");
  gates_->count = count;
}

void CudaBackend::wait_gate(int gate) {
  if (!gates_ || gate < 0 || gate >= gates_->count)
    bad("wait_gate", "gate " + std::to_string(gate) + " was not prepared (prepare_gates)");
  launch_wait_gate(static_cast<const uint32_t*>(gates_->flags.get()), gate, gates_->count, gates_->passed(gate),
                   stream());
}

void CudaBackend::close_gates() {
  if (!gates_ || !gates_->count) bad("close_gates", "no gates prepared");
  if (capturing_ || on_side_) bad("close_gates", "issue it on the compute queue, outside recordings");
  launch_set_word(gates_->word(gates_->count), ++gates_->round, gates_->set_at(gates_->count), stream());
}

void CudaBackend::open_gate(int gate) {
  if (!gates_ || gate < 0 || gate >= gates_->count)
    bad("open_gate", "gate " + std::to_string(gate) + " was not prepared (prepare_gates)");
  if (capturing_) bad("open_gate", "cannot be recorded");
  launch_set_word(gates_->word(gate), gates_->round, gates_->set_at(gate), stream());
}

Backend::GateTimeline CudaBackend::gate_timeline() {
  if (!gates_ || !gates_->count) return {};
  const int n = gates_->count;
  // The device clock read on an idle device, and the host's right after: the offset between the two clocks.
  synchronize();
  launch_set_word(gates_->word(n + 1), 0, gates_->clock_reading(), stream());
  synchronize();
  const auto read_at = std::chrono::steady_clock::now();
  std::vector<uint64_t> t(gates_->time_slots());
  check(cudaMemcpy(t.data(), gates_->times.get(), t.size() * sizeof(uint64_t), cudaMemcpyDeviceToHost),
        "gate_timeline", "cudaMemcpy");
  const uint64_t closed = t[size_t(2 * n + 1)], read = t[size_t(2 * n + 2)];
  auto since = [&](uint64_t at) { return at > closed ? double(at - closed) * 1e-6 : -1.0; };
  GateTimeline out;
  out.gates.resize(size_t(n));
  for (int g = 0; g < n; ++g) out.gates[size_t(g)] = {since(t[size_t(n + 1 + g)]), since(t[size_t(g)])};
  out.closed_at = read_at - std::chrono::nanoseconds(read > closed ? int64_t(read - closed) : 0);
  return out;
}

void CudaBackend::fork_side_queue() {
  if (!gates_) prepare_gates(1);
  if (capturing_) bad("fork_side_queue", "cannot be recorded");
  check(cudaEventRecord(gates_->fork, stream_->stream), "fork_side_queue", "cudaEventRecord");
  check(cudaStreamWaitEvent(gates_->side, gates_->fork, 0), "fork_side_queue", "cudaStreamWaitEvent");
}

void CudaBackend::on_side_queue(const std::function<void()>& fn) {
  if (!gates_) prepare_gates(1);
  if (capturing_) bad("on_side_queue", "cannot be recorded");
  if (on_side_) return fn();
  on_side_ = gates_->side;
  try {
    fn();
  } catch (...) {
    on_side_ = nullptr;
    throw;
  }
  on_side_ = nullptr;
}

void CudaBackend::join_side_queue() {
  if (!gates_) return;
  check(cudaEventRecord(gates_->join, gates_->side), "join_side_queue", "cudaEventRecord");
  check(cudaStreamWaitEvent(stream_->stream, gates_->join, 0), "join_side_queue", "cudaStreamWaitEvent");
}

}  // namespace fluxswap::cuda
