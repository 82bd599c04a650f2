// OpenVINO's half of libtome_ov_ops: the op `BipartiteMerge` (domain
// ai.tome, TOME_SPEC.md) for OpenVINO's core and its ONNX front end. The
// shapes are checked and inferred here; the merge itself is tome-kernels',
// called through `tome_bipartite_merge` (src/lib.rs).

#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/frontend/onnx/extension/conversion.hpp>
#include <openvino/op/op.hpp>
#include <tbb/parallel_for.h>

using ParallelFor = void (*)(size_t count, void (*task)(const void*, size_t), const void* data);

extern "C" int tome_bipartite_merge(const float* x, const float* keys, const float* size, const size_t* dims,
                                    ParallelFor parallel, float* out_x, float* out_size, float* out_log_size,
                                    char* error, size_t error_len);

namespace {

// The kernel's parallel for: TBB's, which runs in the arena of the caller,
// OpenVINO's inference threads.
void parallel_for(size_t count, void (*task)(const void*, size_t), const void* data) {
    tbb::parallel_for(size_t{0}, count, [&](size_t i) { task(data, i); });
}

// Inputs x [B,N,C], keys [B,H,N,D] ([B,H,D,N] with keys_transposed = 1; or
// stacked first of [S,B,H,N,D], as onnxruntime Attention's present) or
// scores [B,ceil(N/2),floor(N/2)], optional size [B,N,1]; outputs x [B,N-r,C], size [B,N-r,1] and log(size)
// [B,N-r,1], or [B,1,N-r,N-r] spread over query rows with log_size_rows = 1 (a node of two outputs leaves the
// third unread); all float32.
class BipartiteMerge : public ov::op::Op {
public:
    OPENVINO_OP("BipartiteMerge", "ai.tome");

    BipartiteMerge() = default;
    BipartiteMerge(const ov::OutputVector& args, int64_t r, int64_t prefix, int64_t keys_transposed, int64_t log_size_rows)
        : Op(args), m_r(r), m_prefix(prefix), m_keys_transposed(keys_transposed), m_log_size_rows(log_size_rows) {
        constructor_validate_and_infer_types();
    }

    void validate_and_infer_types() override {
        const auto inputs = get_input_size();
        NODE_VALIDATION_CHECK(this, inputs == 2 || inputs == 3, "BipartiteMerge takes inputs (x, keys[, size]), has ", inputs);
        NODE_VALIDATION_CHECK(this,
                              m_r >= 1 && m_prefix >= 0 && (m_keys_transposed == 0 || m_keys_transposed == 1) &&
                                  (m_log_size_rows == 0 || m_log_size_rows == 1),
                              "BipartiteMerge needs r >= 1, prefix >= 0, keys_transposed and log_size_rows 0 or 1, has r=",
                              m_r, ", prefix=", m_prefix, ", keys_transposed=", m_keys_transposed,
                              ", log_size_rows=", m_log_size_rows);
        for (size_t i = 0; i < inputs; ++i) {
            NODE_VALIDATION_CHECK(this, get_input_element_type(i).compatible(ov::element::f32), "BipartiteMerge input ", i,
                                  " must be float32");
            const auto rank = get_input_partial_shape(i).rank();
            NODE_VALIDATION_CHECK(this, rank.compatible(3) || (i == 1 && (rank.compatible(4) || rank.compatible(5))),
                                  "BipartiteMerge input ", i, " must have rank ",
                                  i == 1 ? "4 (keys), 5 (keys stacked first) or 3 (scores)" : "3");
        }
        ov::PartialShape x = get_input_partial_shape(0);
        ov::PartialShape out_x{ov::Dimension::dynamic(), ov::Dimension::dynamic(), ov::Dimension::dynamic()};
        if (x.rank().is_static()) {
            out_x = x;
            if (x[1].is_static()) {
                NODE_VALIDATION_CHECK(this, m_r <= (x[1].get_length() - std::min<int64_t>(m_prefix, x[1].get_length())) / 2,
                                      "BipartiteMerge: r=", m_r, " is more than half of the ", x[1].get_length(),
                                      " tokens past the ", m_prefix, " protected");
                out_x[1] = x[1].get_length() - m_r;
            } else {
                out_x[1] = ov::Dimension::dynamic();
            }
        }
        ov::PartialShape out_size = out_x;
        out_size[2] = 1;
        set_output_type(0, ov::element::f32, out_x);
        set_output_type(1, ov::element::f32, out_size);
        set_output_type(2, ov::element::f32,
                        m_log_size_rows ? ov::PartialShape{out_x[0], 1, out_x[1], out_x[1]} : out_size);
    }

    std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& args) const override {
        return std::make_shared<BipartiteMerge>(args, m_r, m_prefix, m_keys_transposed, m_log_size_rows);
    }

    bool visit_attributes(ov::AttributeVisitor& visitor) override {
        visitor.on_attribute("r", m_r);
        visitor.on_attribute("prefix", m_prefix);
        visitor.on_attribute("keys_transposed", m_keys_transposed);
        visitor.on_attribute("log_size_rows", m_log_size_rows);
        return true;
    }

    bool has_evaluate() const override {
        return true;
    }

    bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override {
        const ov::Shape shape = inputs[0].get_shape();
        OPENVINO_ASSERT(shape.size() == 3 && shape[1] >= static_cast<size_t>(m_r), "BipartiteMerge: x must be [B,N,C], is ",
                        shape);
        const size_t out_n = shape[1] - static_cast<size_t>(m_r);
        outputs[0].set_shape({shape[0], out_n, shape[2]});
        outputs[1].set_shape({shape[0], out_n, 1});
        outputs[2].set_shape(m_log_size_rows ? ov::Shape{shape[0], 1, out_n, out_n} : ov::Shape{shape[0], out_n, 1});
        ov::Shape keys = inputs[1].get_shape();
        // Keys stacked [S,B,H,N,D] are the first of the stack, where the
        // input's data starts.
        if (keys.size() == 5 && !m_keys_transposed && keys[0] > 0) {
            keys.erase(keys.begin());
        }
        const size_t tokens_axis = m_keys_transposed ? 3 : 2;
        const bool scores = keys.size() == 3;
        OPENVINO_ASSERT(scores || (keys.size() == 4 && keys[0] == shape[0] && keys[tokens_axis] == shape[1]),
                        "BipartiteMerge: keys must be [B,H,N,D] ([B,H,D,N] transposed, or [S,B,H,N,D] stacked) for x ", shape,
                        ", are ", inputs[1].get_shape());
        OPENVINO_ASSERT(!scores || inputs[1].get_size() == shape[0] * ((shape[1] + 1) / 2) * (shape[1] / 2),
                        "BipartiteMerge: scores must be [B,ceil(N/2),floor(N/2)], are ", keys);
        const size_t dims[9] = {shape[0], shape[1], shape[2], static_cast<size_t>(m_r), static_cast<size_t>(m_prefix),
                                scores ? 0 : keys[1], scores ? 0 : keys[5 - tokens_axis],
                                static_cast<size_t>(m_keys_transposed), static_cast<size_t>(m_log_size_rows)};
        const float* size = inputs.size() > 2 ? inputs[2].data<const float>() : nullptr;
        OPENVINO_ASSERT(!size || inputs[2].get_size() == shape[0] * shape[1], "BipartiteMerge: size must be [B,N,1], is ",
                        inputs[2].get_shape());
        char error[256] = {0};
        // A batch's images run on OpenVINO's own threads: this op runs
        // inside its TBB arena, whose workers wait for work (threads of our
        // own would contend with them).
        const int failed =
            tome_bipartite_merge(inputs[0].data<const float>(), inputs[1].data<const float>(), size, dims, parallel_for,
                                 outputs[0].data<float>(), outputs[1].data<float>(), outputs[2].data<float>(), error,
                                 sizeof error);
        OPENVINO_ASSERT(!failed, "BipartiteMerge: ", error);
        return true;
    }

private:
    int64_t m_r = 0;
    int64_t m_prefix = 0;
    int64_t m_keys_transposed = 0;
    int64_t m_log_size_rows = 0;
};

}  // namespace

// OpenVINO's entry point is `create_extensions`; src/lib.rs exports it and
// calls this (a Rust library exports only its own symbols).
// The ONNX node as the op: `prefix`, `keys_transposed` and `log_size_rows` default to 0, as
// in tract's and onnxruntime's readings of the node.
ov::OutputVector from_onnx(const ov::frontend::NodeContext& node) {
    ov::OutputVector inputs;
    for (size_t i = 0; i < node.get_input_size(); ++i) {
        inputs.push_back(node.get_input(static_cast<int>(i)));
    }
    const auto op = std::make_shared<BipartiteMerge>(inputs, node.get_attribute<int64_t>("r"),
                                                     node.get_attribute<int64_t>("prefix", 0),
                                                     node.get_attribute<int64_t>("keys_transposed", 0),
                                                     node.get_attribute<int64_t>("log_size_rows", 0));
    return op->outputs();
}

extern "C" void tome_create_extensions(std::vector<ov::Extension::Ptr>& extensions) {
    extensions = {
        std::make_shared<ov::OpExtension<BipartiteMerge>>(),
        std::make_shared<ov::frontend::onnx::ConversionExtension>("BipartiteMerge", "ai.tome", from_onnx),
    };
}
