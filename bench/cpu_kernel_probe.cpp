// CPU kernel probe without torch: thread CPU time (not wall time, so less sensitive to other processes
// on a shared machine) of the avx2 qGOFT chain forward and backward (64-row chunks, block gradients) on
// the parallel layout, next to a std::copy of the same data. Medians over repetitions.
//
//   g++ -O3 -std=c++17 -mavx2 -mfma -mf16c -ffp-contract=off -Wno-psabi -Icsrc/cpu \
//       bench/cpu_kernel_probe.cpp csrc/cpu/chain_kernel_avx2.cpp -o build/cpu_kernel_probe
//   build/cpu_kernel_probe D ROWS [REPS [NUM_PAIRS]]      # NUM_PAIRS=0: load/store tiles only
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <vector>
#include <algorithm>
#include <random>
#include "chain_kernel.h"
using namespace qgoft::cpu;
static double now() { timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
int main(int argc, char** argv) {
  int64_t d = atoi(argv[1]), rows = atoi(argv[2]); int reps = argc > 3 ? atoi(argv[3]) : 5;
  std::vector<int32_t> pairs, offsets{0};
  for (int64_t h = 1; h < d; h *= 2) {
    for (int64_t i = 0; i + h < d; i += 2 * h) { pairs.push_back(i); pairs.push_back(i + h); }
    offsets.push_back(pairs.size() / 2);
  }
  if (argc > 4) pairs.resize(2 * atoi(argv[4]));
  int64_t P = pairs.size() / 2;
  std::mt19937 rng(0); std::normal_distribution<float> nd;
  std::vector<float> blocks(4 * P), x(rows * d), g(rows * d), y(rows * d), gx(rows * d), pb(4 * P);
  for (int64_t p = 0; p < P; ++p) { blocks[4*p] = 1 + 0.1f*nd(rng); blocks[4*p+1] = 0.1f*nd(rng); blocks[4*p+2] = 0.1f*nd(rng); blocks[4*p+3] = 1 + 0.1f*nd(rng); }
  for (auto& v : x) v = nd(rng);
  for (auto& v : g) v = nd(rng);
  ChainParams prm; prm.d = d; prm.num_pairs = P; prm.pairs = pairs.data(); prm.blocks = blocks.data();
  std::vector<double> tf, tb, tc;
  const int64_t chunk = 64;  // rows per backward call (as the glue's chunks)
  for (int r = 0; r < reps; ++r) {
    double t0 = now();
    std::copy(x.begin(), x.end(), y.begin());
    double t1 = now();
    avx2::chain_forward(prm, x.data(), d, y.data(), 0, rows);
    double t2 = now();
    for (int64_t r0 = 0; r0 < rows; r0 += chunk)
      avx2::chain_backward(prm, g.data() + r0 * d, d, x.data() + r0 * d, d, gx.data() + r0 * d, 0, std::min(chunk, rows - r0), pb.data(), nullptr);
    double t3 = now();
    tc.push_back(t1 - t0); tf.push_back(t2 - t1); tb.push_back(t3 - t2);
  }
  auto med = [](std::vector<double> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2] * 1e3; };
  double c = med(tc), f = med(tf), b = med(tb);
  double chk = 0; for (int64_t k = 0; k < 4 * P; ++k) chk += pb[k];
  printf("d=%ld rows=%ld P=%ld copy %.3f ms fwd %.3f ms (%.2fx) bwd %.3f ms (%.2fx copy, %.2fx fwd) chk %.6g gx0 %.6g\n", d, rows, P, c, f, f / c, b, b / c, b / f, chk, gx[0]);
}
