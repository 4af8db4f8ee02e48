#pragma once
// Base64 text of PNG bytes (pipeline/png_image.h encode_png), for the b64_json response field.
#include <cstdint>
#include <map>
#include <string>
#include <vector>



namespace fluxswap {

std::string base64_encode(const std::string& bytes);
// Throws Error on characters outside the standard alphabet (tests and tools).
std::string base64_decode(const std::string& text);

}  // namespace fluxswap
