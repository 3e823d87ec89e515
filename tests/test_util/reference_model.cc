#include "tests/test_util/reference_model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace anchorserve {
namespace {

using Json = nlohmann::json;
namespace fs = std::filesystem;

constexpr double kU = 0x1p-24;  // fp32 unit roundoff

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// Minimal safetensors reading, separate from model/safetensors: whole files in memory.
class Checkpoint {
 public:
  absl::Status Open(const std::string& dir) {
    const std::string single = (fs::path(dir) / "model.safetensors").string();
    if (fs::exists(single)) return AddFile(single, nullptr);
    const std::string index = (fs::path(dir) / "model.safetensors.index.json").string();
    auto text = ReadFile(index);
    if (!text.ok()) return text.status();
    const Json root = Json::parse(*text, nullptr, false);
    if (root.is_discarded() || !root.contains("weight_map")) {
      return absl::InvalidArgumentError(absl::StrCat(index, ": no weight_map"));
    }
    std::map<std::string, std::vector<std::string>> names_of_file;
    for (auto it = root["weight_map"].begin(); it != root["weight_map"].end(); ++it) {
      names_of_file[it.value().get<std::string>()].push_back(it.key());
    }
    for (const auto& [file, names] : names_of_file) {
      const absl::Status status = AddFile((fs::path(dir) / file).string(), &names);
      if (!status.ok()) return status;
    }
    return absl::OkStatus();
  }

  bool Has(const std::string& name) const { return entries_.count(name) > 0; }

  // The tensor as doubles (row-major), its shape in `shape`.
  absl::StatusOr<std::vector<double>> Get(const std::string& name,
                                          std::vector<int64_t>* shape) const {
    auto it = entries_.find(name);
    if (it == entries_.end()) return absl::NotFoundError(absl::StrCat("no tensor ", name));
    const Entry& e = it->second;
    *shape = e.shape;
    int64_t count = 1;
    for (int64_t s : e.shape) count *= s;
    const unsigned char* bytes =
        reinterpret_cast<const unsigned char*>(files_[e.file]->data()) + e.offset;
    std::vector<double> out(static_cast<size_t>(count));
    for (int64_t i = 0; i < count; ++i) {
      if (e.dtype == "F32") {
        float f;
        std::memcpy(&f, bytes + 4 * i, 4);
        out[i] = f;
      } else {
        const uint32_t bits = uint32_t{bytes[2 * i]} | uint32_t{bytes[2 * i + 1]} << 8;
        if (e.dtype == "BF16") {
          const uint32_t wide = bits << 16;
          float f;
          std::memcpy(&f, &wide, 4);
          out[i] = f;
        } else {  // F16: sign, 5-bit exponent (bias 15), 10-bit mantissa
          const double sign = (bits & 0x8000u) ? -1.0 : 1.0;
          const int exponent = static_cast<int>((bits >> 10) & 0x1fu);
          const double mantissa = bits & 0x3ffu;
          out[i] = exponent == 0 ? sign * std::ldexp(mantissa, -24)
                                 : sign * std::ldexp(1024.0 + mantissa, exponent - 25);
        }
      }
    }
    return out;
  }

 private:
  struct Entry {
    size_t file;
    std::string dtype;
    std::vector<int64_t> shape;
    size_t offset;  // from the start of the file
  };

  absl::Status AddFile(const std::string& path, const std::vector<std::string>* only) {
    auto text = ReadFile(path);
    if (!text.ok()) return text.status();
    auto contents = std::make_unique<std::string>(std::move(*text));
    if (contents->size() < 8) return absl::InvalidArgumentError(path + ": too short");
    uint64_t header = 0;
    for (int i = 7; i >= 0; --i) header = header << 8 | static_cast<unsigned char>((*contents)[i]);
    const Json root = Json::parse(contents->substr(8, header), nullptr, false);
    if (root.is_discarded()) return absl::InvalidArgumentError(path + ": bad header");
    for (auto it = root.begin(); it != root.end(); ++it) {
      if (it.key() == "__metadata__") continue;
      if (only != nullptr && std::find(only->begin(), only->end(), it.key()) == only->end()) {
        continue;
      }
      Entry e;
      e.file = files_.size();
      e.dtype = it.value()["dtype"].get<std::string>();
      e.shape = it.value()["shape"].get<std::vector<int64_t>>();
      e.offset = 8 + header + it.value()["data_offsets"][0].get<size_t>();
      entries_[it.key()] = e;
    }
    files_.push_back(std::move(contents));
    return absl::OkStatus();
  }

  std::vector<std::unique_ptr<std::string>> files_;
  std::map<std::string, Entry> entries_;
};

struct Config {
  bool qwen2 = false;
  int layers = 0, hidden = 0, inter = 0, heads = 0, kv_heads = 0, head_dim = 0;
  int64_t vocab = 0;
  double eps = 1e-6, theta = 10000;
  bool llama3 = false;
  double factor = 1, low = 1, high = 4, original = 8192;
  bool tied = false;
};

absl::StatusOr<Config> ReadConfig(const std::string& dir) {
  const std::string path = (fs::path(dir) / "config.json").string();
  auto text = ReadFile(path);
  if (!text.ok()) return text.status();
  const Json j = Json::parse(*text, nullptr, false);
  if (j.is_discarded()) return absl::InvalidArgumentError(path + ": bad JSON");
  Config c;
  c.qwen2 = j["architectures"][0].get<std::string>() == "Qwen2ForCausalLM";
  c.layers = j["num_hidden_layers"].get<int>();
  c.hidden = j["hidden_size"].get<int>();
  c.inter = j["intermediate_size"].get<int>();
  c.heads = j["num_attention_heads"].get<int>();
  c.kv_heads = j.value("num_key_value_heads", c.heads);
  c.head_dim = j.contains("head_dim") && !j["head_dim"].is_null() ? j["head_dim"].get<int>()
                                                                  : c.hidden / c.heads;
  c.vocab = j["vocab_size"].get<int64_t>();
  c.eps = j.value("rms_norm_eps", 1e-6);
  c.tied = j.value("tie_word_embeddings", false);
  Json rope;
  if (j.contains("rope_parameters") && !j["rope_parameters"].is_null()) {
    rope = j["rope_parameters"];
    c.theta = rope.value("rope_theta", 10000.0);
  } else {
    c.theta = j.value("rope_theta", 10000.0);
    if (j.contains("rope_scaling")) rope = j["rope_scaling"];
  }
  if (rope.is_object()) {
    const std::string type = rope.contains("rope_type") ? rope["rope_type"].get<std::string>()
                                                        : rope.value("type", "default");
    if (type == "llama3") {
      c.llama3 = true;
      c.factor = rope["factor"].get<double>();
      c.low = rope["low_freq_factor"].get<double>();
      c.high = rope["high_freq_factor"].get<double>();
      c.original = rope["original_max_position_embeddings"].get<double>();
    } else if (type != "default") {
      return absl::InvalidArgumentError("reference: unsupported rope type " + type);
    }
  }
  return c;
}

// A matrix of values with their fp32 error scales, row-major [rows, cols].
struct Bounded {
  int64_t rows = 0, cols = 0;
  std::vector<double> value, sigma;
  Bounded() = default;
  Bounded(int64_t r, int64_t c)
      : rows(r), cols(c), value(static_cast<size_t>(r * c)), sigma(static_cast<size_t>(r * c)) {}
  double& v(int64_t r, int64_t c) { return value[r * cols + c]; }
  double& e(int64_t r, int64_t c) { return sigma[r * cols + c]; }
};

double Square(double x) { return x * x; }

Bounded RmsNorm(Bounded& x, const std::vector<double>& w, double eps) {
  Bounded y(x.rows, x.cols);
  const double h = static_cast<double>(x.cols);
  for (int64_t t = 0; t < x.rows; ++t) {
    double ms = 0, propagated = 0;
    for (int64_t i = 0; i < x.cols; ++i) {
      ms += x.v(t, i) * x.v(t, i);
      propagated += Square(x.v(t, i) * x.e(t, i));
    }
    ms /= h;
    const double s = ms + eps;
    const double r = 1.0 / std::sqrt(s);
    // Mean of squares: propagated input errors, then summation, division and +eps roundings.
    const double ms_var = Square(2.0 / h) * propagated + Square(kU * std::sqrt(h + 2) * s);
    const double r_rel_var = Square(0.5 / s) * ms_var + Square(3 * kU);  // sqrt, division, cast
    for (int64_t i = 0; i < x.cols; ++i) {
      const double yi = w[i] * x.v(t, i) * r;
      y.v(t, i) = yi;
      y.e(t, i) =
          std::sqrt(Square(w[i] * r * x.e(t, i)) + Square(yi) * r_rel_var + Square(2 * kU * yi));
    }
  }
  return y;
}

// y = x W^T (+ b), W [out, in].
Bounded Linear(Bounded& x, const std::vector<double>& w, int64_t out,
               const std::vector<double>* bias) {
  Bounded y(x.rows, out);
  const int64_t in = x.cols;
  const double rounding = kU * std::sqrt(static_cast<double>(in + 1));
  for (int64_t t = 0; t < x.rows; ++t) {
    const double* xv = &x.value[t * in];
    const double* xe = &x.sigma[t * in];
    for (int64_t o = 0; o < out; ++o) {
      const double* wr = &w[o * in];
      double sum = 0, magnitude = 0, propagated = 0;
      for (int64_t i = 0; i < in; ++i) {
        sum += wr[i] * xv[i];
        magnitude += std::fabs(wr[i] * xv[i]);
        propagated += Square(wr[i] * xe[i]);
      }
      if (bias != nullptr) {
        sum += (*bias)[o];
        magnitude += std::fabs((*bias)[o]);
      }
      y.v(t, o) = sum;
      y.e(t, o) = std::sqrt(propagated + Square(rounding * magnitude));
    }
  }
  return y;
}

void AddResidual(Bounded& x, Bounded& y) {
  for (size_t i = 0; i < x.value.size(); ++i) {
    x.value[i] += y.value[i];
    x.sigma[i] = std::sqrt(Square(x.sigma[i]) + Square(y.sigma[i]) + Square(kU * x.value[i]));
  }
}

struct Rope {
  std::vector<double> inv_freq;   // [d/2], exact
  std::vector<double> rel_bound;  // worst-case fp32 relative error of each inv_freq
};

Rope MakeRope(const Config& c) {
  Rope rope;
  const int half = c.head_dim / 2;
  for (int i = 0; i < half; ++i) {
    const double exponent = 2.0 * i / c.head_dim;
    double f = std::pow(c.theta, -exponent);
    // Exponent rounded to fp32 (an error of u * exponent scales the power by ln(theta)), then
    // the power and the reciprocal, each within an ulp.
    double rel = (exponent * std::log(c.theta) + 3) * kU;
    if (c.llama3) {
      const double wavelength = 2 * M_PI / f;
      const double low_wavelength = c.original / c.low, high_wavelength = c.original / c.high;
      if (wavelength > low_wavelength) {
        f /= c.factor;
        rel += kU;
      } else if (wavelength >= high_wavelength) {
        // s = (original / wavelength - low) / (high - low), each step rounded; the result
        // (1 - s) f / factor + s f moves by f (1 - 1/factor) per unit of s.
        const double ratio = c.original / wavelength;
        const double span = c.high - c.low;
        const double s = (ratio - c.low) / span;
        const double ds =
            (ratio * (rel + 3 * kU) + kU * std::fabs(ratio - c.low)) / span + 2 * kU * std::fabs(s);
        const double smoothed = (1 - s) * f / c.factor + s * f;
        rel = std::fabs(1 - 1 / c.factor) * f * ds / smoothed + rel + 5 * kU;
        f = smoothed;
      }
    }
    rope.inv_freq.push_back(f);
    rope.rel_bound.push_back(rel);
  }
  return rope;
}

// Rotates every head of x [N, heads * d] in place (rotate-half pairing).
void ApplyRope(const Rope& rope, int heads, int d, Bounded& x) {
  const int half = d / 2;
  for (int64_t t = 0; t < x.rows; ++t) {
    for (int i = 0; i < half; ++i) {
      const double angle = static_cast<double>(t) * rope.inv_freq[i];
      const double d_angle = std::fabs(angle) * (rope.rel_bound[i] + kU);
      const double c = std::cos(angle), s = std::sin(angle);
      const double dc = std::fabs(s) * d_angle + kU, ds = std::fabs(c) * d_angle + kU;
      for (int hd = 0; hd < heads; ++hd) {
        const int64_t lo = int64_t{hd} * d + i, hi = lo + half;
        const double a = x.v(t, lo), b = x.v(t, hi);
        const double ea = x.e(t, lo), eb = x.e(t, hi);
        const double y_lo = a * c - b * s, y_hi = b * c + a * s;
        // Two products and a sum, each rounded.
        x.e(t, lo) = std::sqrt(Square(c * ea) + Square(s * eb) + Square(a * dc) + Square(b * ds) +
                               Square(kU) * (Square(a * c) + Square(b * s) + Square(y_lo)));
        x.e(t, hi) = std::sqrt(Square(c * eb) + Square(s * ea) + Square(b * dc) + Square(a * ds) +
                               Square(kU) * (Square(b * c) + Square(a * s) + Square(y_hi)));
        x.v(t, lo) = y_lo;
        x.v(t, hi) = y_hi;
      }
    }
  }
}

// Dense causal attention; q [N, Hq*d], k/v [N, Hkv*d] -> [N, Hq*d].
Bounded Attend(Bounded& q, Bounded& k, Bounded& v, int hq, int hkv, int d) {
  const int64_t n = q.rows;
  const int ratio = hq / hkv;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  // Score rounding: the length-d dot product plus pre-scaling q (scale * log2 e in fp32).
  const double score_rounding = kU * std::sqrt(static_cast<double>(d + 3));
  Bounded out(n, int64_t{hq} * d);
  std::vector<double> s(n), s_var(n), p(n);
  for (int h = 0; h < hq; ++h) {
    const int g = h / ratio;
    for (int64_t i = 0; i < n; ++i) {
      const double* qi = &q.value[i * q.cols + int64_t{h} * d];
      const double* qe = &q.sigma[i * q.cols + int64_t{h} * d];
      double m = -INFINITY;
      for (int64_t j = 0; j <= i; ++j) {
        const double* kj = &k.value[j * k.cols + int64_t{g} * d];
        const double* ke = &k.sigma[j * k.cols + int64_t{g} * d];
        double dot = 0, magnitude = 0, propagated = 0;
        for (int e = 0; e < d; ++e) {
          dot += qi[e] * kj[e];
          magnitude += std::fabs(qi[e] * kj[e]);
          propagated += Square(qe[e] * kj[e]) + Square(qi[e] * ke[e]);
        }
        s[j] = scale * dot;
        s_var[j] = Square(scale) * (propagated + Square(score_rounding * magnitude));
        m = std::max(m, s[j]);
      }
      double z = 0;
      for (int64_t j = 0; j <= i; ++j) {
        p[j] = std::exp(s[j] - m);
        z += p[j];
        // The rounding of s - m and the exp approximation act like score errors.
        s_var[j] += Square(kU * (s[j] - m)) + Square(4 * kU);
      }
      for (int64_t j = 0; j <= i; ++j) p[j] /= z;
      const double keys = static_cast<double>(i + 1);
      // P.V accumulation, one rescaling of acc (and l) per key tile of at least 16 keys, and the
      // final division.
      const double sum_rounding = kU * std::sqrt(keys + 1);
      const double rescale_var = Square(2 * kU) * std::ceil(keys / 16) + Square(kU);
      for (int e = 0; e < d; ++e) {
        double o = 0, magnitude = 0;
        for (int64_t j = 0; j <= i; ++j) {
          const double vj = v.value[j * v.cols + int64_t{g} * d + e];
          o += p[j] * vj;
          magnitude += p[j] * std::fabs(vj);
        }
        double var = 0;
        for (int64_t j = 0; j <= i; ++j) {
          const double vj = v.value[j * v.cols + int64_t{g} * d + e];
          const double vje = v.sigma[j * v.cols + int64_t{g} * d + e];
          var += Square(p[j] * vje) + Square(p[j] * (vj - o)) * s_var[j];
        }
        var += Square(sum_rounding * magnitude) + rescale_var * Square(o);
        out.v(i, int64_t{h} * d + e) = o;
        out.e(i, int64_t{h} * d + e) = std::sqrt(var);
      }
    }
  }
  return out;
}

// SiLU(gate) * up, elementwise.
Bounded SwiGlu(Bounded& gate, Bounded& up) {
  Bounded out(gate.rows, gate.cols);
  for (size_t i = 0; i < gate.value.size(); ++i) {
    const double g = gate.value[i];
    const double sigmoid = 1.0 / (1.0 + std::exp(-g));
    const double silu = g * sigmoid;
    const double derivative = sigmoid * (1 + g * (1 - sigmoid));
    // exp, 1 + exp, division (or x * sigmoid), each within an ulp.
    const double silu_var = Square(derivative * gate.sigma[i]) + Square(4 * kU * silu);
    out.value[i] = silu * up.value[i];
    out.sigma[i] = std::sqrt(Square(up.value[i]) * silu_var + Square(silu * up.sigma[i]) +
                             Square(kU * out.value[i]));
  }
  return out;
}

}  // namespace

absl::StatusOr<ReferenceForward> RunReferenceForward(const std::string& dir,
                                                     absl::Span<const int32_t> ids) {
  auto config = ReadConfig(dir);
  if (!config.ok()) return config.status();
  const Config& c = *config;
  Checkpoint checkpoint;
  const absl::Status opened = checkpoint.Open(dir);
  if (!opened.ok()) return opened;
  std::vector<int64_t> shape;
  auto get = [&](const std::string& name) -> absl::StatusOr<std::vector<double>> {
    return checkpoint.Get(name, &shape);
  };
#define REF_GET(var, name)              \
  std::vector<double> var;              \
  {                                     \
    auto got = get(name);               \
    if (!got.ok()) return got.status(); \
    var = std::move(*got);              \
  }

  const int64_t n = static_cast<int64_t>(ids.size());
  const int d = c.head_dim;
  const int64_t q_dim = int64_t{c.heads} * d, kv_dim = int64_t{c.kv_heads} * d;
  const Rope rope = MakeRope(c);
  REF_GET(embed, "model.embed_tokens.weight");
  Bounded x(n, c.hidden);
  for (int64_t t = 0; t < n; ++t) {
    for (int i = 0; i < c.hidden; ++i) x.v(t, i) = embed[int64_t{ids[t]} * c.hidden + i];
  }

  ReferenceForward result;
  result.num_layers = c.layers;
  result.num_kv_heads = c.kv_heads;
  result.head_dim = d;
  result.seq_len = n;
  result.vocab_size = c.vocab;
  for (int layer = 0; layer < c.layers; ++layer) {
    const std::string pre = absl::StrCat("model.layers.", layer, ".");
    REF_GET(input_norm, pre + "input_layernorm.weight");
    REF_GET(wq, pre + "self_attn.q_proj.weight");
    REF_GET(wk, pre + "self_attn.k_proj.weight");
    REF_GET(wv, pre + "self_attn.v_proj.weight");
    REF_GET(wo, pre + "self_attn.o_proj.weight");
    REF_GET(post_norm, pre + "post_attention_layernorm.weight");
    REF_GET(wg, pre + "mlp.gate_proj.weight");
    REF_GET(wu, pre + "mlp.up_proj.weight");
    REF_GET(wd, pre + "mlp.down_proj.weight");
    std::vector<double> bq, bk, bv;
    if (c.qwen2) {
      REF_GET(q_bias, pre + "self_attn.q_proj.bias");
      REF_GET(k_bias, pre + "self_attn.k_proj.bias");
      REF_GET(v_bias, pre + "self_attn.v_proj.bias");
      bq = std::move(q_bias);
      bk = std::move(k_bias);
      bv = std::move(v_bias);
    }

    Bounded normed = RmsNorm(x, input_norm, c.eps);
    Bounded q = Linear(normed, wq, q_dim, c.qwen2 ? &bq : nullptr);
    Bounded k = Linear(normed, wk, kv_dim, c.qwen2 ? &bk : nullptr);
    Bounded v = Linear(normed, wv, kv_dim, c.qwen2 ? &bv : nullptr);
    ApplyRope(rope, c.heads, d, q);
    ApplyRope(rope, c.kv_heads, d, k);

    // [N, Hkv, d] -> [Hkv, N, d]
    const size_t kv_size = static_cast<size_t>(n * kv_dim);
    std::vector<double> kh(kv_size), vh(kv_size), khe(kv_size), vhe(kv_size);
    for (int g = 0; g < c.kv_heads; ++g) {
      for (int64_t t = 0; t < n; ++t) {
        for (int e = 0; e < d; ++e) {
          const int64_t src = t * kv_dim + int64_t{g} * d + e;
          const int64_t dst = (int64_t{g} * n + t) * d + e;
          kh[dst] = k.value[src];
          khe[dst] = k.sigma[src];
          vh[dst] = v.value[src];
          vhe[dst] = v.sigma[src];
        }
      }
    }
    result.k.push_back(std::move(kh));
    result.k_sigma.push_back(std::move(khe));
    result.v.push_back(std::move(vh));
    result.v_sigma.push_back(std::move(vhe));

    Bounded attn = Attend(q, k, v, c.heads, c.kv_heads, d);
    Bounded projected = Linear(attn, wo, c.hidden, nullptr);
    AddResidual(x, projected);
    Bounded normed2 = RmsNorm(x, post_norm, c.eps);
    Bounded gate = Linear(normed2, wg, c.inter, nullptr);
    Bounded up = Linear(normed2, wu, c.inter, nullptr);
    Bounded act = SwiGlu(gate, up);
    Bounded down = Linear(act, wd, c.hidden, nullptr);
    AddResidual(x, down);
  }

  REF_GET(final_norm, "model.norm.weight");
  Bounded last(1, c.hidden);
  for (int i = 0; i < c.hidden; ++i) {
    last.v(0, i) = x.v(n - 1, i);
    last.e(0, i) = x.e(n - 1, i);
  }
  Bounded normed = RmsNorm(last, final_norm, c.eps);
  std::vector<double> head;
  if (c.tied) {
    head = std::move(embed);
  } else {
    REF_GET(lm_head, "lm_head.weight");
    head = std::move(lm_head);
  }
  Bounded logits = Linear(normed, head, c.vocab, nullptr);
  result.logits = std::move(logits.value);
  result.logits_sigma = std::move(logits.sigma);
#undef REF_GET
  return result;
}

}  // namespace anchorserve
