// measure_error.cc -- the float32 error of normact_math.h's approximations,
// over every float of each function's interesting range, against long double
// libm (inputs with |x| < 2^-12 are sampled, every 4096th float).  The numbers quoted in normact_math.h come from this program:
//
//   g++ -O2 -mavx2 -mfma -std=c++17 -I runtime_ops/include \
//       runtime_ops/tools/measure_error.cc -o /tmp/measure_error && /tmp/measure_error
//
// (and once without -mavx2 -mfma: the baseline-ISA code path, where Phi's
// exact x*x split uses Dekker's product instead of an FMA).  Arguments, if
// any, select functions by name (`/tmp/measure_error log softplus`).  log is
// swept over every normal float, [FLT_MIN, FLT_MAX], by bit pattern.  "rel" is max |got/want - 1| over inputs whose true
// result is a normal float (|want| >= FLT_MIN); "abs<tiny" is the max absolute
// error where the true result is below FLT_MIN (those may flush to zero).
// Also checks NaN / +-Inf handling.  Takes a few minutes on one core (the log
// sweep alone, 2.1e9 floats, about two).
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "normact_math.h"

using namespace normact;

namespace {

struct Stat {
  double rel = 0, worst_x = 0, tiny_abs = 0;
  long n = 0;
  void add(float x, float got, long double want) {
    ++n;
    if (std::fabs((double)want) < FLT_MIN) {
      const double a = std::fabs((double)(got - want));
      if (a > tiny_abs) tiny_abs = a;
      return;
    }
    const double r = std::fabs((double)((got - want) / want));
    if (r > rel || r != r) {
      rel = r;
      worst_x = x;
    }
  }
};

// Every float in [lo, hi] with |x| >= 2^-12, one by one; below that (where
// every function here is its Taylor series' first terms) every 4096th float.
float next(float x) {
  if (std::fabs(x) >= 0x1p-12f) return std::nextafter(x, INFINITY);
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if (x < 0 && (u & 0x7fffffffu) > 4096) u -= 4096;
  else if (x < 0) u = 0;
  else u += 4096;
  std::memcpy(&x, &u, 4);
  return x;
}

template <class F, class R>
Stat sweep(float lo, float hi, F f, R ref) {
  Stat s;
  for (float x = lo; x <= hi; x = next(x)) s.add(x, f(x), ref((long double)x));
  return s;
}

// Every positive normal float, by bit pattern.
template <class F, class R>
Stat sweep_bits(uint32_t lo, uint32_t hi, F f, R ref) {
  Stat s;
  for (uint32_t u = lo;; ++u) {
    float x;
    std::memcpy(&x, &u, 4);
    s.add(x, f(x), ref((long double)x));
    if (u == hi) break;
  }
  return s;
}

long double phi_ref(long double x) { return 0.5L * std::erfc(-x / std::sqrt(2.0L)); }

void report(const char* name, const char* range, const Stat& s) {
  std::printf("%-10s %-22s rel %.3g (at x = %.9g)   abs<tiny %.3g   [%ld floats]\n", name, range, s.rel,
              s.worst_x, s.tiny_abs, s.n);
}

int check_special() {
  int bad = 0;
  const float inf = INFINITY, nan = NAN;
  auto expect = [&](const char* what, float got, float want) {
    const bool ok = (want != want) ? got != got : got == want;
    if (!ok) {
      std::printf("SPECIAL %s: got %g want %g\n", what, got, want);
      ++bad;
    }
  };
  expect("exp(nan)", na_exp(nan), nan);
  expect("exp(inf)", na_exp(inf), inf);
  expect("exp(-inf)", na_exp(-inf), 0.0f);
  expect("exp(88.8)", na_exp(88.8f), inf);
  expect("sigmoid(nan)", na_sigmoid(nan), nan);
  expect("sigmoid(inf)", na_sigmoid(inf), 1.0f);
  expect("sigmoid(-inf)", na_sigmoid(-inf), 0.0f);
  expect("sigmoid(0)", na_sigmoid(0.0f), 0.5f);
  expect("tanh(nan)", na_tanh(nan), nan);
  expect("tanh(inf)", na_tanh(inf), na_tanh(7.9f));
  expect("tanh(-0)", 1.0f / na_tanh(-0.0f), -inf);
  expect("tanh(1e-30)", na_tanh(1e-30f), 1e-30f);
  expect("silu(-inf)", act::Silu::f(-inf, 0, 0), 0.0f);
  expect("silu(inf)", act::Silu::f(inf, 0, 0), inf);
  expect("silu(nan)", act::Silu::f(nan, 0, 0), nan);
  expect("gelu(-inf)", act::Gelu::f(-inf, 0, 0), 0.0f);
  expect("gelu(inf)", act::Gelu::f(inf, 0, 0), inf);
  expect("gelu(nan)", act::Gelu::f(nan, 0, 0), nan);
  expect("gelu(0)", act::Gelu::f(0.0f, 0, 0), 0.0f);
  expect("log(1)", na_log(1.0f), 0.0f);
  expect("log(2)", na_log(2.0f), 0.693147181f);
  expect("softplus(nan)", act::Softplus::f(nan, 0, 0), nan);
  expect("softplus(inf)", act::Softplus::f(inf, 0, 0), inf);
  expect("softplus(-inf)", act::Softplus::f(-inf, 0, 0), 0.0f);
  expect("softplus(0)", act::Softplus::f(0.0f, 0, 0), 0.693147181f);
  expect("mish(nan)", act::Mish::f(nan, 0, 0), nan);
  expect("mish(inf)", act::Mish::f(inf, 0, 0), inf);
  expect("mish(-inf)", act::Mish::f(-inf, 0, 0), 0.0f);
  return bad;
}

}  // namespace

int main(int argc, char** argv) {
  auto want = [&](const char* name) {
    if (argc < 2) return true;
    for (int i = 1; i < argc; ++i)
      if (std::strcmp(argv[i], name) == 0) return true;
    return false;
  };
  if (want("exp"))
    report("exp", "[-87.3, 88.72]", sweep(-87.3f, 88.72f, na_exp, [](long double x) { return std::exp(x); }));
  if (want("exp_clamped"))
    report("exp_clamped", "[-86.6, 88.72]",
           sweep(-86.6f, 88.72f, exp_clamped, [](long double x) { return std::exp(x); }));
  if (want("expm1"))
    report("expm1", "[-20, 20]", sweep(-20.0f, 20.0f, na_expm1, [](long double x) { return std::expm1(x); }));
  if (want("log"))
    report("log", "[FLT_MIN, FLT_MAX]",
           sweep_bits(0x00800000u, 0x7f7fffffu, na_log, [](long double x) { return std::log(x); }));
  if (want("softplus"))
    report("softplus", "[-87.3, 40]", sweep(-87.3f, 40.0f, [](float x) { return act::Softplus::f(x, 0, 0); },
                                          [](long double x) {
                                            return (x < 0 ? 0.0L : x) + std::log1p(std::exp(-std::fabs(x)));
                                          }));
  if (want("mish"))
    report("mish", "[-87.3, 40]", sweep(-87.3f, 40.0f, [](float x) { return act::Mish::f(x, 0, 0); },
                                      [](long double x) {
                                        const long double sp = (x < 0 ? 0.0L : x) + std::log1p(std::exp(-std::fabs(x)));
                                        return x * std::tanh(sp);
                                      }));
  auto sig = [](long double x) { return 1.0L / (1.0L + std::exp(-x)); };
  if (want("sigmoid")) report("sigmoid", "[-104, 20]", sweep(-104.0f, 20.0f, na_sigmoid, sig));
  if (want("silu"))
    report("silu", "[-88.72, 20]", sweep(-88.72f, 20.0f, [](float x) { return act::Silu::f(x, 0, 0); },
                                       [&](long double x) { return x * sig(x); }));
  if (want("tanh"))
    report("tanh", "[-10, 10]", sweep(-10.0f, 10.0f, na_tanh, [](long double x) { return std::tanh(x); }));
  if (want("Phi")) report("Phi(-|x|)", "[-13.4, 0]", sweep(-13.4f, 0.0f, na_phi_lower, phi_ref));
  if (want("gelu"))
    report("gelu", "[-14, 14]", sweep(-14.0f, 14.0f, [](float x) { return act::Gelu::f(x, 0, 0); },
                                     [](long double x) { return x * phi_ref(x); }));
  const int bad = check_special();
  std::printf("special values: %s\n", bad ? "FAILED" : "ok");
  return bad ? 1 : 0;
}
