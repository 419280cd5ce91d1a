// The mixed-communication kernel (include/fusedcomm/kernels/mixed_comm.cuh, unchanged) run on
// the host for bf16: every rank's blocks as threads over one buffer of rows, the ranks
// unsynchronised, each running the same long sequence of calls (every TP x DP split of the
// world, every op kind, one and two rounds, sizes from one pack to several rounds per block),
// compared with the fp32 rank-order reference (as floats: -0.0 may arrive as +0.0); then a rank
// whose peer never comes. Prints "failures N".
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "fusedcomm/kernels/mixed_comm.cuh"

using namespace fusedcomm;

namespace {

constexpr int kThreads = 8;
constexpr int kGrid = 3;
using T = __nv_bfloat16;

struct Rank {
  int32_t claim = 0;
  FailureRecord record{};
};

void launch(const MixedCommArgs& a, bool scatter, bool two) {
  std::vector<std::thread> threads;
  std::vector<std::unique_ptr<std::barrier<>>> barriers;
  std::vector<EmulatedBlock> blocks(a.plan.blocks);
  for (int b = 0; b < a.plan.blocks; ++b) {
    barriers.push_back(std::make_unique<std::barrier<>>(kThreads));
    blocks[b].barrier = barriers.back().get();
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&a, &blocks, b, t, scatter, two] {
        threadIdx.x = t;
        blockIdx.x = b;
        this_block = &blocks[b];
        if (scatter) {
          two ? mixed_comm_kernel<T, true, true, kThreads>(a)
              : mixed_comm_kernel<T, true, false, kThreads>(a);
        } else {
          two ? mixed_comm_kernel<T, false, true, kThreads>(a)
              : mixed_comm_kernel<T, false, false, kThreads>(a);
        }
      });
    }
  }
  for (auto& t : threads) t.join();
}

uint8_t* aligned(std::vector<uint8_t>& raw) {
  return raw.data() + (128 - reinterpret_cast<uintptr_t>(raw.data()) % 128) % 128;
}

// Rows of `world` ranks: zero, the slots holding the sentinel.
struct Rows {
  MixedCommLayout l;
  std::vector<uint8_t> raw;
  uint8_t* base;
  explicit Rows(int world) : l{world}, raw(world * l.size_per_rank() + 128, 0) {
    base = aligned(raw);
    for (int q = 0; q < world; ++q) {
      uint8_t* row = base + q * l.size_per_rank();
      for (int64_t i = l.slots(); i < l.size_per_rank(); i += 2) {
        row[i] = 0x00;
        row[i + 1] = 0x80;
      }
    }
  }
};

struct Call {
  int tp, dp;
  bool scatter, two;
  int64_t packs;                                // per rank (per DP block when scattering)
  std::vector<std::vector<uint16_t>> in, out;  // by rank
};

float f32(uint16_t bits) { return __bfloat162float(T{bits}); }

MixedCommArgs args(const Rows& rows, Rank& me, int rank, uint64_t timeout_ns, const Call& c,
                   const uint16_t* in, uint16_t* out) {
  MixedCommArgs a{};
  a.site.failure.claim = &me.claim;
  a.site.failure.record = &me.record;
  a.site.rows = MixedCommRows{rows.base, rows.l.size_per_rank(), rows.l};
  a.site.timeout_ns = timeout_ns;
  a.site.op = kOpMixedComm;
  a.site.rank = rank;
  a.site.world = rows.l.local_size;
  const bool two = MixedCommPlan::two_rounds(c.two, c.tp, c.packs);
  a.plan = MixedCommPlan::for_call(c.packs, c.tp, two, kGrid);
  a.in = reinterpret_cast<const uint4*>(in);
  a.out = reinterpret_cast<uint4*>(out);
  a.tp = c.tp;
  a.dp = c.dp;
  return a;
}

// The expected output of rank r (fp32 sums in rank order, one rounding).
std::vector<float> expect(const Call& c, int r, int world) {
  const int64_t e = c.packs * 8;  // elements per rank (per block when scattering)
  const int t = r % c.tp, d = r / c.tp;
  std::vector<float> want;
  if (c.scatter) {
    for (int64_t i = 0; i < e; ++i) {
      float acc = 0;
      bool first = true;
      for (int s = 0; s < world; ++s) {
        const float v = f32(c.in[s][d * e + i]);
        acc = first ? v : acc + v;
        first = false;
      }
      want.push_back(__bfloat162float(__float2bfloat16_rn(acc)));
    }
    (void)t;
    return want;
  }
  for (int dd = 0; dd < c.dp; ++dd) {
    for (int64_t i = 0; i < e; ++i) {
      float acc = f32(c.in[dd * c.tp][i]);
      for (int tt = 1; tt < c.tp; ++tt) acc += f32(c.in[tt + dd * c.tp][i]);
      want.push_back(__bfloat162float(__float2bfloat16_rn(acc)));
    }
  }
  return want;
}

int exchange(int world, std::mt19937_64& rng) {
  Rows rows(world);
  std::vector<Rank> ranks(world);
  std::uniform_real_distribution<float> uni(-0.5f, 0.5f);
  std::vector<Call> calls;
  const int64_t sizes[] = {1, 3, 37, 600, 5000, 2};
  for (int tp = 1; tp <= world; ++tp) {
    if (world % tp) continue;
    const int dp = world / tp;
    for (int kind = 0; kind < 2; ++kind) {
      const bool scatter = kind == 1;
      if (scatter ? (dp == 1 && tp == 1) : false) continue;
      for (int two = 0; two < (tp > 1 ? 2 : 1); ++two) {
        if (!scatter && dp > 1 && tp == 1 && two) continue;
        for (int64_t p : sizes) {
          Call c{tp, dp, scatter, two == 1, p, {}, {}};
          const int64_t in_e = p * 8 * (scatter ? dp : 1), out_e = p * 8 * (scatter ? 1 : dp);
          for (int r = 0; r < world; ++r) {
            c.in.emplace_back(in_e);
            for (auto& x : c.in.back()) x = __float2bfloat16_rn(uni(rng)).bits;
            c.out.emplace_back(out_e, 0x5A5A);  // poison
          }
          calls.push_back(std::move(c));
        }
      }
    }
  }
  std::vector<std::thread> drivers;
  for (int r = 0; r < world; ++r) {
    drivers.emplace_back([&, r] {
      for (Call& c : calls) {
        const MixedCommArgs a =
            args(rows, ranks[r], r, 60000000000ull, c, c.in[r].data(), c.out[r].data());
        launch(a, c.scatter, MixedCommPlan::two_rounds(c.two, c.tp, c.packs));
      }
    });
  }
  for (auto& d : drivers) d.join();
  int failures = 0;
  for (size_t i = 0; i < calls.size(); ++i) {
    const Call& c = calls[i];
    for (int r = 0; r < world; ++r) {
      const std::vector<float> want = expect(c, r, world);
      for (size_t j = 0; j < want.size(); ++j) {
        if (f32(c.out[r][j]) != want[j] && failures++ < 10) {
          printf("world %d call %zu (tp %d dp %d %s %s packs %lld): rank %d element %zu: %g, "
                 "want %g\n",
                 world, i, c.tp, c.dp, c.scatter ? "scatter" : "gather", c.two ? "two" : "one",
                 static_cast<long long>(c.packs), r, j, f32(c.out[r][j]), want[j]);
        }
      }
      if (c.tp > 1) {  // the TP group's ranks agree bit for bit
        const int first = (r / c.tp) * c.tp;
        if (c.out[r] != c.out[first] && failures++ < 10) {
          printf("world %d call %zu: ranks %d and %d differ\n", world, i, r, first);
        }
      }
    }
  }
  for (int r = 0; r < world; ++r) {
    if (ranks[r].claim != 0) {
      printf("world %d: rank %d gave up (code %d)\n", world, r, ranks[r].record.code);
      ++failures;
    }
  }
  printf("world %d: %zu calls checked\n", world, calls.size());
  return failures;
}

// Rank 0 of 2 calls alone (timeout 50 ms): it records a timeout on rank 1, marks rank 1's row,
// and its next launch does nothing.
int missing_peer() {
  Rows rows(2);
  Rank me;
  Call c{2, 1, false, false, 4, {}, {}};
  std::vector<uint16_t> in(32, 0x3f80), out(32, 0x5A5A);
  const MixedCommArgs a = args(rows, me, 0, 50000000ull, c, in.data(), out.data());
  launch(a, false, false);
  uint32_t mark;
  memcpy(&mark, rows.base + rows.l.size_per_rank() + rows.l.abort_marks(), 4);
  printf("missing peer: claim %d code %d peer %d phase %d, mark in the peer's row %u\n", me.claim,
         me.record.code, me.record.peer, me.record.phase, mark);
  int failures = me.claim == 1 && me.record.code == kFailureTimeout && me.record.peer == 1 &&
                         me.record.phase == kMixedPhaseData && mark == 1
                     ? 0
                     : 1;
  std::fill(out.begin(), out.end(), 0x1111);
  launch(a, false, false);
  if (out[0] != 0x1111) {
    printf("a failed communicator still wrote\n");
    ++failures;
  }
  return failures;
}

}  // namespace

int main() {
  blockDim.x = kThreads;
  std::mt19937_64 rng(7);
  int failures = 0;
  for (int world : {2, 4}) failures += exchange(world, rng);
  failures += missing_peer();
  printf("failures %d\n", failures);
  return failures != 0;
}
