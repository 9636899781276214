// Tokenizers: llama2.c tok512.bin against ids from an independent implementation, and Hugging Face
// byte-level BPE against small tokenizer.json fixtures whose ids are worked out by hand below.
#include "tokenizer/tokenizer.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "core/error.h"
#include "reference/llama2c_pieces.h"
#include "support.h"

namespace kvdrift {
namespace {

using json = nlohmann::json;
using Ids = std::vector<TokenId>;

std::string tok512_path() { return test::stories260k_dir() + "/tok512.bin"; }

using test::error_message;

// ---------------------------------------------------------------------------------------------
// llama2.c tokenizer.bin

std::vector<std::string> tinystories_sample() {
  const std::string text =
      test::read_file(std::string(KVDRIFT_SOURCE_DIR) + "/../shared/data/tinystories/tinystories_sample_cs336.txt");
  const std::string separator = "<|endoftext|>";
  const char* whitespace = " \t\r\n";
  std::vector<std::string> stories;
  for (size_t start = 0; start <= text.size();) {
    size_t end = text.find(separator, start);
    if (end == std::string::npos) end = text.size();
    std::string story = text.substr(start, end - start);
    story.erase(story.find_last_not_of(whitespace) + 1);
    story.erase(0, story.find_first_not_of(whitespace));
    if (!story.empty()) stories.push_back(story);
    start = end + separator.size();
  }
  return stories;
}

TEST(TokenizerLlama2c, SpecialIdsAndVocabSize) {
  auto tokenizer = load_tokenizer(tok512_path());
  EXPECT_EQ(tokenizer->vocab_size(), 512);
  EXPECT_EQ(tokenizer->bos_id(), TokenId{1});
  EXPECT_EQ(tokenizer->eos_ids(), Ids{2});
  EXPECT_EQ(tokenizer->encode("", true, true), (Ids{1, 2}));
  EXPECT_EQ(tokenizer->encode("", false), Ids{});
}

// Expected ids come from a short Python port of llama2.c run.c encode() (read tok512.bin; BOS,
// dummy " " token, one token per UTF-8 codepoint or one per byte (byte + 3) when the codepoint is
// not a piece, then merge the adjacent pair whose concatenation is a piece with the highest score,
// first pair on ties, until none is left). Pieces are noted after each sequence.
TEST(TokenizerLlama2c, EncodesLikeLlama2cRunC) {
  auto tokenizer = load_tokenizer(tok512_path());
  // <s> " Once" " upon" " a" " time" "," " there" " was" " a" " little" " girl" ...
  EXPECT_EQ(tokenizer->encode("Once upon a time, there was a little girl named Lily.", true),
            (Ids{1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426}));
  // " Lily" " li" "ke" "s" " c" "at" "s" "."
  EXPECT_EQ(tokenizer->encode("Lily likes cats.", false), (Ids{317, 397, 354, 419, 280, 294, 419, 426}));
  // <s> " The" " e" "nd" "." </s>
  EXPECT_EQ(tokenizer->encode("The end.", true, true), (Ids{1, 291, 344, 264, 426, 2}));
  // "Tom said, \"Hi!\"\n": the newline is byte token <0x0A> = 10 + 3.
  EXPECT_EQ(tokenizer->encode("Tom said, \"Hi!\"\n", true), (Ids{1, 274, 287, 336, 432, 313, 440, 417, 443, 436, 13}));
  // The curly quotes are pieces of their own (465, 466), the dummy prefix " " stays alone.
  EXPECT_EQ(tokenizer->encode("\u201cHi\u201d", true), (Ids{1, 410, 465, 440, 417, 466}));
}

// kvdrift merges through a priority queue; run.c rescans the sequence per merge. Same tokens on
// every TinyStories sample story, a byte-fallback-heavy text, and ties (runs of one repeated piece).
TEST(TokenizerLlama2c, PriorityQueueMergesGiveRunCTokens) {
  auto tokenizer = load_tokenizer(tok512_path());
  const reference::Llama2cPieces run_c(tok512_path());
  std::vector<std::string> texts = tinystories_sample();
  texts.push_back("aaaaaaaaaaaaaaaaaaaaaaaaa bbbbbbbbbbbbbbbb   ...... the the the the");
  texts.push_back("Zoë ate 3 crêpes — 🙂 and said “¡hola!” \t\x01\x7f");
  for (const auto& text : texts) EXPECT_EQ(tokenizer->encode(text, true), run_c.encode(text)) << text;
}

TEST(TokenizerLlama2c, ByteFallback) {
  auto tokenizer = load_tokenizer(tok512_path());
  // "日" = E6 97 A5 is not a piece: its bytes + 3.
  EXPECT_EQ(tokenizer->encode("日", true), (Ids{1, 410, 0xE6 + 3, 0x97 + 3, 0xA5 + 3}));
  EXPECT_EQ(tokenizer->decode({1, 410, 0xE6 + 3, 0x97 + 3, 0xA5 + 3}), "日");
  // U+1F600 = F0 9F 98 80 between " a" (261) and "b" (430).
  EXPECT_EQ(tokenizer->encode("a\U0001F600b", true), (Ids{1, 261, 0xF0 + 3, 0x9F + 3, 0x98 + 3, 0x80 + 3, 430}));
  // "ï" (C3 AF) falls back to bytes while "é" is piece 485.
  const Ids naive_cafe = {1, 297, 412, 0xC3 + 3, 0xAF + 3, 360, 280, 412, 431, 485};
  EXPECT_EQ(tokenizer->encode("naïve café", true), naive_cafe);
  EXPECT_EQ(tokenizer->decode(naive_cafe), "naïve café");
}

TEST(TokenizerLlama2c, DecodeDropsOnlyTheSpaceAfterBos) {
  auto tokenizer = load_tokenizer(tok512_path());
  EXPECT_EQ(tokenizer->decode({1, 291, 344, 264, 426, 2}), "The end.");
  EXPECT_EQ(tokenizer->decode({291, 344, 264, 426}), " The end.");  // no BOS: the dummy prefix stays
  EXPECT_EQ(tokenizer->decode({291, 1, 291}), " TheThe");
  EXPECT_THROW(tokenizer->decode({512}), Error);
  EXPECT_THROW(tokenizer->decode({-1}), Error);
}

TEST(TokenizerLlama2c, RoundTripsEveryTinyStoriesSample) {
  auto tokenizer = load_tokenizer(tok512_path());
  const auto stories = tinystories_sample();
  ASSERT_EQ(stories.size(), 5u);
  // Token count and id sum of each story (BOS included), from the same Python port of run.c.
  const std::vector<std::pair<size_t, TokenId>> expected = {
      {374, 133213}, {330, 115306}, {223, 76234}, {425, 149177}, {457, 161544}};
  for (size_t i = 0; i < stories.size(); ++i) {
    const Ids ids = tokenizer->encode(stories[i], true);
    EXPECT_EQ(ids.size(), expected[i].first) << "story " << i;
    EXPECT_EQ(std::accumulate(ids.begin(), ids.end(), TokenId{0}), expected[i].second) << "story " << i;
    EXPECT_EQ(tokenizer->decode(ids), stories[i]) << "story " << i;
  }
}

// ---------------------------------------------------------------------------------------------
// Hugging Face tokenizer.json (byte-level BPE)

// Byte-level characters (GPT-2 bytes_to_unicode): printable ASCII stands for itself, "Ġ" (U+0120)
// for the space byte, and "Ã" (U+00C3), "©" (U+00A9) for the two bytes C3 A9 of "é".
// Merges, by rank: 0 h+e, 1 l+l, 2 he+ll, 3 hell+o, 4 Ġ+w, 5 o+r, 6 Ġw+or, 7 1+2, 8 3+4, 9 12+3,
// 10 4+5, 11 Ã+©. "Ġworld" (31) is in the vocabulary but no merge path reaches it.
json hf_fixture() {
  return json::parse(R"({
    "version": "1.0",
    "normalizer": null,
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
    "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
    "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
    "added_tokens": [
      {"id": 32, "content": "<|endoftext|>", "special": true, "single_word": false, "lstrip": false,
       "rstrip": false, "normalized": false},
      {"id": 33, "content": "<|pad|>", "special": true, "single_word": false, "lstrip": false,
       "rstrip": false, "normalized": false},
      {"id": 34, "content": "<|begin_of_text|>", "special": true, "single_word": false, "lstrip": false,
       "rstrip": false, "normalized": false}
    ],
    "model": {
      "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
      "vocab": {
        "!": 0, ",": 1, "1": 2, "2": 3, "3": 4, "4": 5, "5": 6, "H": 7, "d": 8, "e": 9, "h": 10,
        "l": 11, "o": 12, "r": 13, "w": 14, "\u0120": 15, "\u010a": 16, "\u00c3": 17, "\u00a9": 18,
        "he": 19, "ll": 20, "hell": 21, "hello": 22, "\u0120w": 23, "or": 24, "\u0120wor": 25,
        "12": 26, "34": 27, "123": 28, "45": 29, "\u00c3\u00a9": 30, "\u0120world": 31
      },
      "merges": ["h e", "l l", "he ll", "hell o", "\u0120 w", "o r", "\u0120w or", "1 2", "3 4", "12 3",
                 "4 5", "\u00c3 \u00a9"]
    }
  })");
}

// The Llama-3 pre-tokenizer regex, as its tokenizer.json has it.
constexpr const char* kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|)"
    R"( ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// Llama-3 layout: Sequence[Split(regex, Isolated), ByteLevel(no regex)], merges as [left, right]
// pairs, and a TemplateProcessing post-processor that starts with <|begin_of_text|>.
json llama3_style(json fixture, const std::string& split_pattern) {
  fixture["pre_tokenizer"] = json::parse(R"({"type": "Sequence", "pretokenizers": [
      {"type": "Split", "pattern": {"Regex": ""}, "behavior": "Isolated", "invert": false},
      {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]})");
  fixture["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = split_pattern;
  json pairs = json::array();
  for (const auto& merge : fixture["model"]["merges"]) {
    const auto line = merge.get<std::string>();
    pairs.push_back({line.substr(0, line.find(' ')), line.substr(line.find(' ') + 1)});
  }
  fixture["model"]["merges"] = pairs;
  fixture["post_processor"] = json::parse(R"({"type": "Sequence", "processors": [
      {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
      {"type": "TemplateProcessing",
       "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
       "special_tokens": {
         "<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [34], "tokens": ["<|begin_of_text|>"]}}}]})");
  return fixture;
}

// Writes `fixture` as tokenizer.json into `dir` and loads it through the directory.
std::unique_ptr<Tokenizer> load_fixture(const json& fixture, const std::string& dir) {
  test::write_file(dir + "/tokenizer.json", fixture.dump(2));
  return load_tokenizer(dir);
}

TEST(TokenizerHf, ByteLevelPreTokenizer) {
  auto tokenizer = load_fixture(hf_fixture(), test::scratch_dir());
  EXPECT_EQ(tokenizer->vocab_size(), 35);
  EXPECT_EQ(tokenizer->bos_id(), std::nullopt);  // GPT-2 style: no template, no BOS
  EXPECT_EQ(tokenizer->eos_ids(), Ids{32});
  // "hello": h e l l o -> he l l o -> he ll o -> hell o -> hello (22).
  // " world": Ġ w o r l d -> Ġw o r l d -> Ġw or l d -> Ġwor l d (25, 11, 8); no merge reaches Ġworld.
  EXPECT_EQ(tokenizer->encode("hello world", true), (Ids{22, 25, 11, 8}));
  // GPT-2 regex pieces "Hello" "," " world" "!"; "Hello": H e l l o -> H e ll o (7, 9, 20, 12).
  EXPECT_EQ(tokenizer->encode("Hello, world!", false), (Ids{7, 9, 20, 12, 1, 25, 11, 8, 0}));
  // ` ?\p{N}+` keeps "12345" whole: 1 2 3 4 5 -> 12 3 4 5 -> 12 34 5 (rank 8 before 12+3 at 9).
  EXPECT_EQ(tokenizer->encode("12345", false), (Ids{26, 27, 6}));
  // The newline is Ċ (16), a piece of its own between the two words.
  EXPECT_EQ(tokenizer->encode("hello\nhello", false), (Ids{22, 16, 22}));
  EXPECT_EQ(tokenizer->encode("", true, true), Ids{32});  // add_eos appends the first EOS
}

TEST(TokenizerHf, SequenceOfSplitRegexAndByteLevel) {
  auto tokenizer = load_fixture(llama3_style(hf_fixture(), kLlama3Pattern), test::scratch_dir());
  EXPECT_EQ(tokenizer->bos_id(), TokenId{34});
  EXPECT_EQ(tokenizer->encode("hello world", true, true), (Ids{34, 22, 25, 11, 8, 32}));
  // `\p{N}{1,3}` cuts "12345" into "123" (1 2 3 -> 12 3 -> 123) and "45".
  EXPECT_EQ(tokenizer->encode("12345", false), (Ids{28, 29}));
  EXPECT_EQ(tokenizer->decode({34, 28, 29, 32}), "12345");
}

TEST(TokenizerHf, SplitKeepsTextBetweenMatches) {
  // Isolating single digits leaves "hello" between matches as a piece of its own: no 1+2 merge.
  auto tokenizer = load_fixture(llama3_style(hf_fixture(), R"(\p{N})"), test::scratch_dir());
  EXPECT_EQ(tokenizer->encode("hello12", false), (Ids{22, 2, 3}));
  EXPECT_EQ(tokenizer->encode("1hello", false), (Ids{2, 22}));
}

// Pieces of 100,000 bytes, whose tokens follow from the fixture's merges: a long word's merges run
// through a priority queue (rescanning per merge was quadratic: 200 KB took 28 s), ties merge leftmost.
TEST(TokenizerHf, LongPiecesMergeLikeShortOnes) {
  auto tokenizer = load_fixture(hf_fixture(), test::scratch_dir());
  std::string hellos;
  for (int i = 0; i < 20'000; ++i) hellos += "hello";
  EXPECT_EQ(tokenizer->encode(hellos, false), Ids(20'000, 22));
  // 1 2 3 4 5 -> 12 3 4 5 -> 12 34 5 in every repeat: 3+4 (rank 8) comes before 12+3 (rank 9).
  std::string digits;
  Ids digit_ids;
  for (int i = 0; i < 20'000; ++i) {
    digits += "12345";
    digit_ids.insert(digit_ids.end(), {26, 27, 6});
  }
  EXPECT_EQ(tokenizer->encode(digits, false), digit_ids);
  // l+l on 99,999 l's: leftmost first, so 49,999 ll and one l at the end.
  Ids ls(49'999, 20);
  ls.push_back(11);
  EXPECT_EQ(tokenizer->encode(std::string(99'999, 'l'), false), ls);
}

// A pre-tokenizer regex may take 10,000 + 4 match steps per byte left to search: Llama-3's regex on a
// 1 MB run of spaces needs about one per byte and passes; a backtracking regex (it took 43 s on 2.5 KB
// under PCRE2's default limit) is refused naming the file, the regex and where it stopped.
TEST(TokenizerHf, RegexWorkIsBoundedAndTheRefusalNamesTheTokenizer) {
  auto llama3 = load_fixture(llama3_style(hf_fixture(), kLlama3Pattern), test::scratch_dir());
  // \s+(?!\S) takes 999,999 spaces, [^\r\n\p{L}\p{N}]?\p{L}+ takes " hello": Ġ (15) each, then Ġ hello.
  Ids spaces(1'000'000, 15);
  spaces.push_back(22);
  EXPECT_EQ(llama3->encode(std::string(1'000'000, ' ') + "hello", false), spaces);
  const std::string dir = test::scratch_dir();
  auto backtracking = load_fixture(llama3_style(hf_fixture(), R"((\p{L}+)+\d)"), dir);
  EXPECT_EQ(test::error_message([&] { backtracking->encode(std::string(2500, 'h'), false); }),
            dir + "/tokenizer.json: pre-tokenizer regex \"(\\\\p{L}+)+\\\\d\" needs more than 20000 match steps at byte 0 of a "
                  "2500-byte text (the bound is 10000 + 4 per byte left; this regex backtracks far more than Hugging "
                  "Face's pre-tokenizers do)");
}

TEST(TokenizerHf, IgnoreMergesUsesWholeVocabularyPieces) {
  json fixture = hf_fixture();
  fixture["model"]["ignore_merges"] = true;
  auto tokenizer = load_fixture(fixture, test::scratch_dir());
  // " world" is Ġworld (31) as a whole; "hello" is 22 either way; "Hello" is not whole in the vocabulary.
  EXPECT_EQ(tokenizer->encode("hello world", false), (Ids{22, 31}));
  EXPECT_EQ(tokenizer->encode("Hello world", false), (Ids{7, 9, 20, 12, 31}));
}

TEST(TokenizerHf, AddedTokensInsideText) {
  auto tokenizer = load_fixture(hf_fixture(), test::scratch_dir());
  // "héllo" = h C3 A9 l l o: l+l (rank 1) merges before Ã+© (rank 11): h, Ã©, ll, o.
  EXPECT_EQ(tokenizer->encode("hello<|endoftext|>h\u00e9llo", false), (Ids{22, 32, 10, 30, 20, 12}));
  EXPECT_EQ(tokenizer->encode("<|pad|><|pad|>hello<|endoftext|>", false), (Ids{33, 33, 22, 32}));
  // An incomplete marker is ordinary text, and "<" is not in the fixture's vocabulary.
  EXPECT_THROW(tokenizer->encode("<|pad", false), Error);
}

TEST(TokenizerHf, DecodeRoundTripWithMultiByteCharacter) {
  auto tokenizer = load_fixture(hf_fixture(), test::scratch_dir());
  const std::string text = "h\u00e9llo world<|pad|>12345\nHello, world!";
  const Ids ids = tokenizer->encode(text, false);
  EXPECT_EQ(ids, (Ids{10, 30, 20, 12, 25, 11, 8, 33, 26, 27, 6, 16, 7, 9, 20, 12, 1, 25, 11, 8, 0}));
  EXPECT_EQ(tokenizer->decode(ids), text);
  // EOS decodes to nothing, other added tokens to their content; a lone byte token to its raw byte.
  EXPECT_EQ(tokenizer->decode({22, 32, 33}), "hello<|pad|>");
  EXPECT_EQ(tokenizer->decode({17}), "\xC3");
  EXPECT_THROW(tokenizer->decode({35}), Error);
}

TEST(TokenizerHf, NfcNormalizerIsAcceptedOthersAreNot) {
  json fixture = hf_fixture();
  fixture["normalizer"] = {{"type", "NFC"}};
  const std::string dir = test::scratch_dir();
  EXPECT_EQ(load_fixture(fixture, dir)->encode("hello world", false), (Ids{22, 25, 11, 8}));
  fixture["normalizer"] = {{"type", "Lowercase"}};
  const std::string message = error_message([&] { load_fixture(fixture, dir); });
  EXPECT_NE(message.find(dir + "/tokenizer.json"), std::string::npos) << message;
  EXPECT_NE(message.find("Lowercase"), std::string::npos) << message;
}

// ---------------------------------------------------------------------------------------------
// Errors name the file and the problem.

void expect_error_mentions(const std::string& message, const std::vector<std::string>& parts) {
  for (const auto& part : parts) EXPECT_NE(message.find(part), std::string::npos) << message << " lacks " << part;
}

TEST(TokenizerErrors, MissingFile) {
  const std::string missing = test::scratch_dir() + "/missing.bin";
  expect_error_mentions(error_message([&] { load_tokenizer(missing); }), {"tokenizer file not found", missing});
  const std::string empty_dir = test::scratch_dir();
  expect_error_mentions(error_message([&] { load_tokenizer(empty_dir); }), {empty_dir + "/tokenizer.json"});
}

TEST(TokenizerErrors, MalformedLlama2cFile) {
  const std::string dir = test::scratch_dir();
  const std::string tok512 = test::read_file(tok512_path());
  const std::string truncated = dir + "/truncated.bin";
  test::write_file(truncated, tok512.substr(0, tok512.size() - 3));
  expect_error_mentions(error_message([&] { load_tokenizer(truncated); }), {truncated, "truncated"});
  const std::string trailing = dir + "/trailing.bin";
  test::write_file(trailing, tok512 + "xy");
  EXPECT_EQ(error_message([&] { load_tokenizer(trailing); }),
            trailing + ": llama2.c tokenizer ends inside token 512 (the score of it is cut off at byte " +
                std::to_string(tok512.size() + 2) + "): the file is truncated or has 2 trailing bytes");

  // Header (max_token_length 7), then token 0 with score 0 and byte length -1.
  const std::string negative = dir + "/negative.bin";
  test::write_file(negative, std::string("\x07\0\0\0\0\0\0\0\xff\xff\xff\xff", 12));
  expect_error_mentions(error_message([&] { load_tokenizer(negative); }), {negative, "byte length -1"});

  const std::string header_only = dir + "/header_only.bin";
  test::write_file(header_only, tok512.substr(0, 4));
  expect_error_mentions(error_message([&] { load_tokenizer(header_only); }), {header_only, "holds 0 tokens"});
}

TEST(TokenizerErrors, TokenizerJsonThatIsNotJson) {
  const std::string path = test::scratch_dir() + "/tokenizer.json";
  test::write_file(path, "{\"model\": {\"type\": \"BPE\",");
  expect_error_mentions(error_message([&] { load_tokenizer(path); }), {path, "not valid JSON"});
}

TEST(TokenizerErrors, UnsupportedModelType) {
  json fixture = hf_fixture();
  fixture["model"]["type"] = "WordPiece";
  const std::string dir = test::scratch_dir();
  expect_error_mentions(error_message([&] { load_fixture(fixture, dir); }), {dir + "/tokenizer.json", "WordPiece"});
}

// Hugging Face tokenizers gives the second of two added tokens with one id another id (tokenizers 0.23:
// "x<a>y<bb>z" with both at 256 encodes <bb> as 257; tests/oracle/test_model_files.py), so the file is refused.
TEST(TokenizerErrors, TwoAddedTokensWithOneId) {
  json fixture = hf_fixture();
  fixture["added_tokens"][1]["id"] = 32;
  const std::string dir = test::scratch_dir();
  EXPECT_EQ(error_message([&] { load_fixture(fixture, dir); }),
            dir + "/tokenizer.json: added tokens \"<|endoftext|>\" and \"<|pad|>\" both have id 32 (Hugging Face "
                  "tokenizers would give the second another id); give each added token its own id");
}

TEST(TokenizerErrors, MergeOfUnknownTokens) {
  json fixture = hf_fixture();
  fixture["model"]["merges"].push_back("x y");
  const std::string dir = test::scratch_dir();
  expect_error_mentions(error_message([&] { load_fixture(fixture, dir); }), {dir + "/tokenizer.json", "merge 12"});
}

}  // namespace
}  // namespace kvdrift
