#pragma once
// Raw Unicode Character Database tables behind text/unicode.h (generated, sorted by code point so lookups can
// binary-search). Only unicode.cpp should need these; the tokenizers use its functions.
#include <cstddef>
#include <cstdint>

namespace fluxswap::unicode::data {

struct CodeRange {
  char32_t first, last;  // inclusive
};

// Code points first, first+stride, ..., last lower-case to cp + delta.
struct CaseRun {
  char32_t first, last;
  int32_t delta;
  uint8_t stride;
};

struct SingletonDecomposition {
  char32_t cp, to;
};

struct PairDecomposition {
  char32_t cp, first, second;
};

struct CombiningRun {
  char32_t first, last;  // inclusive
  uint8_t ccc;           // canonical combining class, never 0 here
};

extern const CodeRange kLetters[];
extern const size_t kLettersCount;
extern const CodeRange kNumbers[];
extern const size_t kNumbersCount;
extern const CodeRange kMarks[];
extern const size_t kMarksCount;
extern const CodeRange kFormats[];
extern const size_t kFormatsCount;
extern const CaseRun kLowercaseRuns[];
extern const size_t kLowercaseRunsCount;

extern const SingletonDecomposition kSingletonDecompositions[];
extern const size_t kSingletonDecompositionsCount;
extern const PairDecomposition kPairDecompositions[];
extern const size_t kPairDecompositionsCount;
extern const char32_t kCompositionExclusions[];
extern const size_t kCompositionExclusionsCount;
extern const CombiningRun kCombiningClasses[];
extern const size_t kCombiningClassesCount;

}  // namespace fluxswap::unicode::data
