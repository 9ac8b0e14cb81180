// ort_util.cc -- see ort_util.h.
#include "ort_util.h"

namespace normact {

OrtStatusPtr make_error(const OrtApi* api, OrtErrorCode code, const std::string& msg) {
  return api->CreateStatus(code, msg.c_str());
}

OrtStatusPtr read_float(const OrtApi* api, const OrtKernelInfo* info, const char* op, const char* name,
                        float fallback, float* out) {
  *out = fallback;
  if (!name) return nullptr;
  OrtStatusPtr st = api->KernelInfoGetAttribute_float(info, name, out);
  if (!st) return nullptr;
  api->ReleaseStatus(st);
  *out = fallback;
  int64_t iv = 0;
  st = api->KernelInfoGetAttribute_int64(info, name, &iv);
  if (!st) {
    return make_error(api, ORT_INVALID_ARGUMENT,
                      std::string("ai.normact::") + op + ": attribute '" + name + "' must be a float, got an int");
  }
  api->ReleaseStatus(st);
  return nullptr;
}

OrtStatusPtr tensor_info(const OrtApi* api, const OrtValue* v, std::vector<int64_t>* dims, size_t* n,
                         ONNXTensorElementDataType* type) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  NORMACT_RETURN_IF_ERROR(api->GetTensorTypeAndShape(v, &info));
  size_t rank = 0;
  OrtStatusPtr st = api->GetDimensionsCount(info, &rank);
  if (!st) {
    dims->resize(rank);
    st = api->GetDimensions(info, dims->data(), rank);
  }
  if (!st) st = api->GetTensorShapeElementCount(info, n);
  if (!st) st = api->GetTensorElementType(info, type);
  api->ReleaseTensorTypeAndShapeInfo(info);
  return st;
}

}  // namespace normact
