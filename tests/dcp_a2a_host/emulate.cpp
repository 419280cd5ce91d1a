// The DCP all-to-all kernel (include/fusedcomm/kernels/dcp_a2a.cuh, unchanged) run on the host:
// every rank's blocks as threads over one buffer of rows, the ranks unsynchronised, each
// calling a sequence of shapes back to back (the channel count changes from call to call, and
// some calls take several rounds per channel); then a rank whose peer never comes. Prints
// "failures N".
#include <cstring>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "fusedcomm/kernels/dcp_a2a.cuh"

using namespace fusedcomm;

namespace {

constexpr int kThreads = 32;

struct Rank {
  int32_t claim = 0;
  FailureRecord record{};
};

void launch(const DcpA2AArgs& a) {
  std::vector<std::thread> threads;
  std::vector<std::unique_ptr<std::barrier<>>> barriers;
  std::vector<EmulatedBlock> blocks(a.plan.channels);
  for (int c = 0; c < a.plan.channels; ++c) {
    barriers.push_back(std::make_unique<std::barrier<>>(kThreads));
    blocks[c].barrier = barriers.back().get();
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&a, &blocks, c, t] {
        threadIdx.x = t;
        blockIdx.x = c;
        this_block = &blocks[c];
        dcp_a2a_alltoall<kThreads>(a);
      });
    }
  }
  for (auto& t : threads) t.join();
}

uint8_t* aligned(std::vector<uint8_t>& raw) {
  return raw.data() + (128 - reinterpret_cast<uintptr_t>(raw.data()) % 128) % 128;
}

DcpA2AArgs args(uint8_t* base, const DcpA2ALayout& l, Rank& me, int rank, uint64_t timeout_ns,
                int64_t n, int64_t dv, int64_t s, const uint8_t* in_o, const uint8_t* in_s,
                uint8_t* out_o, uint8_t* out_s) {
  DcpA2AArgs a{};
  a.site.failure.claim = &me.claim;
  a.site.failure.record = &me.record;
  a.site.rows = DcpA2ARows{base, l.size_per_rank(), l};
  a.site.timeout_ns = timeout_ns;
  a.site.op = kOpDcpA2A;
  a.site.rank = rank;
  a.site.world = l.cp_size;
  a.plan = DcpA2APlan::make(n, dv * 2, s * 4, l.cp_size);
  a.in_o = in_o;
  a.in_s = in_s;
  a.out_o = out_o;
  a.out_s = out_s;
  a.o_bytes = dv * 2;
  a.s_bytes = s * 4;
  return a;
}

struct Call {
  int64_t n, dv, s;
  std::vector<std::vector<uint8_t>> in_o, in_s, out_o, out_s;  // by rank
};

int exchange(int world, std::mt19937_64& rng) {
  const DcpA2ALayout l{world};
  std::vector<uint8_t> raw(world * l.size_per_rank() + 128, 0);
  uint8_t* base = aligned(raw);
  std::vector<Rank> ranks(world);
  const int64_t shapes[][3] = {{1, 64, 2},   {40, 64, 2},   {70, 4096, 2}, {5, 8, 4},
                               {300, 64, 2}, {70, 4096, 2}, {3, 64, 2}};
  std::vector<Call> calls;
  for (const auto& shape : shapes) {
    Call c{shape[0], shape[1], shape[2], {}, {}, {}, {}};
    const size_t ob = c.n * world * c.dv * 2, sb = c.n * world * c.s * 4;
    for (int r = 0; r < world; ++r) {
      c.in_o.emplace_back(ob);
      c.in_s.emplace_back(sb);
      for (auto& x : c.in_o.back()) x = static_cast<uint8_t>(rng());
      for (auto& x : c.in_s.back()) x = static_cast<uint8_t>(rng());
      c.out_o.emplace_back(ob, 0xA5);  // poison
      c.out_s.emplace_back(sb, 0xA5);
    }
    calls.push_back(std::move(c));
  }
  std::vector<std::thread> drivers;
  for (int r = 0; r < world; ++r) {
    drivers.emplace_back([&, r] {
      for (Call& c : calls) {
        launch(args(base, l, ranks[r], r, 20000000000ull, c.n, c.dv, c.s, c.in_o[r].data(),
                    c.in_s[r].data(), c.out_o[r].data(), c.out_s[r].data()));
      }
    });
  }
  for (auto& d : drivers) d.join();
  int failures = 0;
  for (size_t i = 0; i < calls.size(); ++i) {
    const Call& c = calls[i];
    const int64_t ob = c.dv * 2, sb = c.s * 4;
    for (int r = 0; r < world; ++r) {
      for (int p = 0; p < world; ++p) {
        for (int64_t e = 0; e < c.n; ++e) {
          if (memcmp(&c.out_o[r][(e * world + p) * ob], &c.in_o[p][(e * world + r) * ob], ob) ||
              memcmp(&c.out_s[r][(e * world + p) * sb], &c.in_s[p][(e * world + r) * sb], sb)) {
            if (failures++ < 10) {
              printf("cp %d call %zu: rank %d, entry %lld from rank %d differs\n", world, i, r,
                     static_cast<long long>(e), p);
            }
          }
        }
      }
    }
  }
  for (int r = 0; r < world; ++r) {
    if (ranks[r].claim != 0) {
      printf("cp %d: rank %d gave up (code %d)\n", world, r, ranks[r].record.code);
      ++failures;
    }
  }
  printf("cp %d: %zu calls checked\n", world, calls.size());
  return failures;
}

// Rank 0 of 2 calls alone (timeout 50 ms): it records a timeout on rank 1, marks rank 1's row,
// and its next launch does nothing.
int missing_peer() {
  const DcpA2ALayout l{2};
  std::vector<uint8_t> raw(2 * l.size_per_rank() + 128, 0);
  uint8_t* base = aligned(raw);
  Rank me;
  std::vector<uint8_t> o(4 * 2 * 128, 1), s(4 * 2 * 8, 2), oo(o.size()), so(s.size());
  const DcpA2AArgs a =
      args(base, l, me, 0, 50000000ull, 4, 64, 2, o.data(), s.data(), oo.data(), so.data());
  launch(a);
  uint32_t mark;
  memcpy(&mark, base + l.size_per_rank() + l.abort_marks(), 4);
  printf("missing peer: claim %d code %d peer %d phase %d, mark in the peer's row %u\n", me.claim,
         me.record.code, me.record.peer, me.record.phase, mark);
  int failures = me.claim == 1 && me.record.code == kFailureTimeout && me.record.peer == 1 &&
                         me.record.phase == kDcpPhaseReceive && mark == 1
                     ? 0
                     : 1;
  std::fill(oo.begin(), oo.end(), 0xEE);
  launch(a);
  if (oo[0] != 0xEE) {
    printf("a failed workspace still copied\n");
    ++failures;
  }
  return failures;
}

}  // namespace

int main() {
  blockDim.x = kThreads;
  std::mt19937_64 rng(42);
  int failures = 0;
  for (int world : {1, 2, 3, 5}) failures += exchange(world, rng);
  failures += missing_peer();
  printf("failures %d\n", failures);
  return failures != 0;
}
