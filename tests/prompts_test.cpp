// Prompt sources: every kind on small fixture files (exact texts, ids, answers, offset/limit,
// templates, each error), then the shared evaluation files, encoded with the stories260K llama2.c
// tokenizer (512 tokens, BOS = 1).
#include "io/prompts.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/error.h"
#include "support.h"

namespace kvdrift {
namespace {

using json = nlohmann::json;
using Ids = std::vector<TokenId>;
using Texts = std::vector<std::string>;
using test::error_message;

const Tokenizer& tok512() {
  static const std::unique_ptr<Tokenizer> tokenizer = load_tokenizer(test::stories260k_dir() + "/tok512.bin");
  return *tokenizer;
}

std::string shared_data(const std::string& relative) {
  return std::string(KVDRIFT_SOURCE_DIR) + "/../shared/data/" + relative;
}

std::string write_fixture(const std::string& name, const std::string& contents) {
  const std::string path = test::scratch_dir() + "/" + name;
  test::write_file(path, contents);
  return path;
}

PromptSource inline_source(Texts texts) {
  PromptSource source;
  source.kind = PromptKind::Inline;
  source.texts = std::move(texts);
  return source;
}

PromptSource jsonl_source(const std::string& path, const std::string& field) {
  PromptSource source;
  source.kind = PromptKind::Jsonl;
  source.path = path;
  source.field = field;
  return source;
}

Texts ids_of(const std::vector<Prompt>& prompts) {
  Texts ids;
  for (const auto& prompt : prompts) ids.push_back(prompt.id);
  return ids;
}

Texts texts_of(const std::vector<Prompt>& prompts) {
  Texts texts;
  for (const auto& prompt : prompts) texts.push_back(prompt.text);
  return texts;
}

Texts answers_of(const std::vector<Prompt>& prompts) {
  Texts answers;
  for (const auto& prompt : prompts) answers.push_back(prompt.answer);
  return answers;
}

bool starts_with(const std::string& text, const std::string& prefix) { return text.rfind(prefix, 0) == 0; }

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

json first_record(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return json::parse(line);
}

// Every prompt starts with BOS and decodes back to its text.
void expect_bos_and_round_trip(const std::vector<Prompt>& prompts) {
  for (const auto& prompt : prompts) {
    ASSERT_FALSE(prompt.tokens.empty()) << prompt.id;
    EXPECT_EQ(prompt.tokens[0], 1) << prompt.id;
    EXPECT_EQ(tok512().decode(prompt.tokens), prompt.text) << prompt.id;
  }
}

// ---------------------------------------------------------------------------------------------
// Fixtures

TEST(Prompts, InlineTextsAreEncodedVerbatim) {
  PromptSource source = inline_source({"The end.", "  Lily likes cats.\n"});
  auto prompts = load_prompts(source, &tok512());
  EXPECT_EQ(ids_of(prompts), (Texts{"inline:0", "inline:1"}));
  EXPECT_EQ(texts_of(prompts), (Texts{"The end.", "  Lily likes cats.\n"}));
  EXPECT_EQ(answers_of(prompts), (Texts{"", ""}));
  // <s> " The" " e" "nd" "." (as in tokenizer_test)
  EXPECT_EQ(prompts[0].tokens, (Ids{1, 291, 344, 264, 426}));
  expect_bos_and_round_trip(prompts);

  source.add_bos = false;
  EXPECT_EQ(load_prompts(source, &tok512())[0].tokens, (Ids{291, 344, 264, 426}));
}

TEST(Prompts, TextFileGivesOnePromptPerNonEmptyLine) {
  const std::string path = write_fixture("lines.txt", "The end.  \n\n   \n  Lily likes cats.\r\nTom said hi\n");
  PromptSource source;
  source.kind = PromptKind::TextFile;
  source.path = path;
  auto prompts = load_prompts(source, &tok512());
  EXPECT_EQ(ids_of(prompts), (Texts{"lines:0", "lines:1", "lines:2"}));
  EXPECT_EQ(texts_of(prompts), (Texts{"The end.", "Lily likes cats.", "Tom said hi"}));
  EXPECT_EQ(prompts[0].tokens, (Ids{1, 291, 344, 264, 426}));
  expect_bos_and_round_trip(prompts);
}

TEST(Prompts, TextFileSeparatorTrimsPiecesAndSkipsEmptyOnes) {
  const std::string path = write_fixture(
      "stories.txt", "\nOnce there was a cat.\n<|endoftext|>\n\n  \n<|endoftext|>The dog ran.\n\n<|endoftext|>\n");
  PromptSource source;
  source.kind = PromptKind::TextFile;
  source.path = path;
  source.separator = "<|endoftext|>";
  auto prompts = load_prompts(source, &tok512());
  EXPECT_EQ(ids_of(prompts), (Texts{"stories:0", "stories:1"}));
  EXPECT_EQ(texts_of(prompts), (Texts{"Once there was a cat.", "The dog ran."}));
  expect_bos_and_round_trip(prompts);
}

TEST(Prompts, JsonlFieldAnswerAndIdRules) {
  const std::string path = write_fixture("qa.jsonl",
                                         "{\"question\": \"What is 2+3?\", \"answer\": 5, \"id\": \"q-a\"}\n"
                                         "\n"
                                         "{\"question\": \"Half of 3?\", \"answer\": 1.50, \"level\": [1, 2]}\r\n"
                                         "{\"question\": \"Name it.\", \"answer\": \"seven\", \"unique_id\": \"u/2\", "
                                         "\"task_id\": \"T/2\"}\n"
                                         "{\"question\": \"Last one.\", \"answer\": -4, \"id\": 42}\n");
  PromptSource source = jsonl_source(path, "question");
  source.answer_field = "answer";
  auto prompts = load_prompts(source, &tok512());
  // The record index skips the blank line; task_id wins over unique_id and id; a numeric id is
  // printed as in the file.
  EXPECT_EQ(ids_of(prompts), (Texts{"q-a", "qa:1", "T/2", "42"}));
  EXPECT_EQ(texts_of(prompts), (Texts{"What is 2+3?", "Half of 3?", "Name it.", "Last one."}));
  EXPECT_EQ(answers_of(prompts), (Texts{"5", "1.50", "seven", "-4"}));
  expect_bos_and_round_trip(prompts);

  source.answer_field.clear();
  EXPECT_EQ(answers_of(load_prompts(source, &tok512())), (Texts{"", "", "", ""}));
}

TEST(Prompts, JsonlTemplateRendersFieldsAndDoubledBraces) {
  const std::string path = write_fixture("sets.jsonl",
                                         "{\"n\": 7, \"question\": \"Is {1} a set?\", \"x\": 2.5e-3}\n"
                                         "{\"n\": 8, \"question\": \"Is {} empty?\", \"x\": 0}\n");
  PromptSource source = jsonl_source(path, "ignored when a template is given");
  source.template_text = "Problem {n}: {question}\nWrite {{1, 2}} for sets; x = {{{x}}}.\nSolution:";
  auto prompts = load_prompts(source, &tok512());
  // Braces inside field values are not expanded again.
  EXPECT_EQ(texts_of(prompts), (Texts{"Problem 7: Is {1} a set?\nWrite {1, 2} for sets; x = {2.5e-3}.\nSolution:",
                                      "Problem 8: Is {} empty?\nWrite {1, 2} for sets; x = {0}.\nSolution:"}));
  EXPECT_EQ(ids_of(prompts), (Texts{"sets:0", "sets:1"}));
  expect_bos_and_round_trip(prompts);
}

TEST(Prompts, OffsetAndLimitKeepStableIds) {
  PromptSource source = inline_source({"a", "b", "c", "d", "e"});
  source.offset = 1;
  source.limit = 2;
  EXPECT_EQ(ids_of(load_prompts(source, &tok512())), (Texts{"inline:1", "inline:2"}));
  source.offset = 3;
  source.limit = 0;
  EXPECT_EQ(texts_of(load_prompts(source, &tok512())), (Texts{"d", "e"}));
  source.limit = 10;
  EXPECT_EQ(ids_of(load_prompts(source, &tok512())), (Texts{"inline:3", "inline:4"}));
  source.offset = 4;
  source.limit = 1;
  EXPECT_EQ(ids_of(load_prompts(source, &tok512())), (Texts{"inline:4"}));
}

TEST(Prompts, TokenIdsAreUsedAsGiven) {
  PromptSource source;
  source.kind = PromptKind::TokenIds;
  source.ids = {{1, 291, 344, 264, 426}, {0, 511}, {7}};
  source.offset = 1;
  auto prompts = load_prompts(source, nullptr);
  EXPECT_EQ(ids_of(prompts), (Texts{"ids:1", "ids:2"}));
  EXPECT_EQ(texts_of(prompts), (Texts{"", ""}));
  EXPECT_EQ(prompts[0].tokens, (Ids{0, 511}));
  EXPECT_EQ(prompts[1].tokens, (Ids{7}));
  // add_bos applies to texts only; 511 is the last id of a 512-token vocabulary.
  source.add_bos = false;
  source.offset = 0;
  prompts = load_prompts(source, &tok512());
  EXPECT_EQ(prompts[0].tokens, (Ids{1, 291, 344, 264, 426}));
  EXPECT_EQ(tok512().decode(prompts[0].tokens), "The end.");
}

// ---------------------------------------------------------------------------------------------
// Errors

TEST(Prompts, MissingFileNamesThePath) {
  PromptSource source = jsonl_source("/nonexistent/kvdrift/math.jsonl", "problem");
  EXPECT_EQ(error_message([&] { load_prompts(source, &tok512()); }),
            "prompt file not found: /nonexistent/kvdrift/math.jsonl");
  source.kind = PromptKind::TextFile;
  EXPECT_EQ(error_message([&] { load_prompts(source, &tok512()); }),
            "prompt file not found: /nonexistent/kvdrift/math.jsonl");
  // A device, a FIFO or a folder exists but is not read to an end: each is named for what it is.
  const std::string dir = test::scratch_dir();
  const std::string fifo = dir + "/fifo";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  for (const auto& [path, kind] : std::vector<std::pair<std::string, std::string>>{
           {"/dev/zero", "a character device"}, {fifo, "a FIFO"}, {dir, "a folder"}}) {
    source.path = path;
    EXPECT_EQ(error_message([&] { load_prompts(source, &tok512()); }),
              "prompt file " + path + " is " + kind + ", not a file kvdrift can read to its end; name a regular file");
  }
}

TEST(Prompts, TruncatedGzipIsAnError) {
  const std::string whole = test::read_file(shared_data("humaneval/HumanEval.jsonl.gz"));
  const std::string path = write_fixture("cut.jsonl.gz", whole.substr(0, whole.size() / 2));
  EXPECT_EQ(error_message([&] { load_prompts(jsonl_source(path, "prompt"), &tok512()); }),
            "cannot read prompt file " + path + ": gzip data ends early");
}

TEST(Prompts, JsonlLineThatIsNotJsonNamesFileAndLine) {
  const std::string path = write_fixture("bad.jsonl", "{\"problem\": \"ok\"}\n\n{\"problem\": \"cut\n");
  const std::string message = error_message([&] { load_prompts(jsonl_source(path, "problem"), &tok512()); });
  EXPECT_TRUE(starts_with(message, path + ":3: not JSON: ")) << message;

  const std::string array_path = write_fixture("array.jsonl", "[\"problem\"]\n");
  EXPECT_EQ(error_message([&] { load_prompts(jsonl_source(array_path, "problem"), &tok512()); }),
            array_path + ":1: not a JSON object");
}

TEST(Prompts, MissingFieldNamesFileLineAndField) {
  const std::string path = write_fixture("math.jsonl",
                                         "{\"problem\": \"1+1\", \"answer\": \"2\"}\n"
                                         "{\"problem\": \"2+2\", \"solution\": \"4\"}\n");
  PromptSource source = jsonl_source(path, "question");
  EXPECT_EQ(error_message([&] { load_prompts(source, &tok512()); }), path + ":1: record has no field 'question'");

  source.field = "problem";
  source.answer_field = "answer";
  EXPECT_EQ(error_message([&] { load_prompts(source, &tok512()); }), path + ":2: record has no field 'answer'");

  source.answer_field.clear();
  source.template_text = "{problem} = {answer}";
  EXPECT_EQ(error_message([&] { load_prompts(source, &tok512()); }), path + ":2: record has no field 'answer'");

  // Records outside offset/limit are still validated.
  source.limit = 1;
  EXPECT_EQ(error_message([&] { load_prompts(source, &tok512()); }), path + ":2: record has no field 'answer'");
}

TEST(Prompts, FieldThatIsNotStringOrNumberNamesFileLineAndType) {
  const std::string path = write_fixture("types.jsonl",
                                         "{\"problem\": \"ok\", \"answer\": true}\n"
                                         "{\"problem\": {\"text\": \"a\"}}\n");
  PromptSource source = jsonl_source(path, "problem");
  source.answer_field = "answer";
  EXPECT_EQ(error_message([&] { load_prompts(source, &tok512()); }),
            path + ":1: field 'answer' is a boolean, not a string or number");
  source.answer_field.clear();
  EXPECT_EQ(error_message([&] { load_prompts(source, &tok512()); }),
            path + ":2: field 'problem' is an object, not a string or number");
}

TEST(Prompts, UnbalancedTemplateBraceNamesTheTemplate) {
  const std::string path = write_fixture("one.jsonl", "{\"problem\": \"1+1\"}\n");
  PromptSource source = jsonl_source(path, "");
  source.template_text = "Problem: {problem\nSolution:";
  EXPECT_EQ(error_message([&] { load_prompts(source, &tok512()); }),
            "template \"Problem: {problem\nSolution:\": '{' at offset 9 opens no {name}");
  source.template_text = "Problem: {problem}}";
  EXPECT_EQ(error_message([&] { load_prompts(source, &tok512()); }),
            "template \"Problem: {problem}}\": '}' at offset 18 closes no {name} (write }} for a literal brace)");
  source.template_text = "Problem: {}";
  EXPECT_EQ(error_message([&] { load_prompts(source, &tok512()); }),
            "template \"Problem: {}\": '{' at offset 9 opens no {name}");
  source.template_text = "";
  EXPECT_EQ(error_message([&] { load_prompts(source, &tok512()); }),
            "jsonl " + path + ": needs a field or a template for the prompt text");
}

TEST(Prompts, EmptySelectionSaysOffsetOfTotal) {
  PromptSource source = inline_source({"a", "b", "c"});
  source.offset = 3;
  EXPECT_EQ(error_message([&] { load_prompts(source, &tok512()); }), "no prompts: inline texts after offset 3 of 3");

  const std::string path = write_fixture("blank.txt", "\n  \n\n");
  PromptSource file_source;
  file_source.kind = PromptKind::TextFile;
  file_source.path = path;
  EXPECT_EQ(error_message([&] { load_prompts(file_source, &tok512()); }),
            "no prompts: " + path + " after offset 0 of 0");
}

TEST(Prompts, PromptWithoutTokensIsAnError) {
  PromptSource source = inline_source({"a", ""});
  source.add_bos = false;
  EXPECT_EQ(error_message([&] { load_prompts(source, &tok512()); }),
            "prompt inline:1 encodes to no tokens (text \"\", add_bos false)");
  source.add_bos = true;
  EXPECT_EQ(load_prompts(source, &tok512())[1].tokens, (Ids{1}));

  PromptSource ids_source;
  ids_source.kind = PromptKind::TokenIds;
  ids_source.ids = {{1}, {}};
  EXPECT_EQ(error_message([&] { load_prompts(ids_source, nullptr); }), "prompt ids:1 has no tokens");
}

TEST(Prompts, TokenIdsOutOfRange) {
  PromptSource source;
  source.kind = PromptKind::TokenIds;
  source.ids = {{1, 5, -3}};
  EXPECT_EQ(error_message([&] { load_prompts(source, nullptr); }),
            "prompt ids:0: token -3 at position 2 is negative");
  source.ids = {{1, 2}, {1, 512, 600}};
  EXPECT_NO_THROW(load_prompts(source, nullptr));  // no tokenizer, no vocabulary to check against
  EXPECT_EQ(error_message([&] { load_prompts(source, &tok512()); }),
            "prompt ids:1: token 512 at position 1 is outside the tokenizer's vocabulary of 512 tokens");
}

TEST(Prompts, TextSourceNeedsATokenizer) {
  EXPECT_EQ(error_message([&] { load_prompts(inline_source({"a"}), nullptr); }),
            "prompt source 'inline' needs a tokenizer to encode its texts");
}

// ---------------------------------------------------------------------------------------------
// Shared evaluation files

TEST(Prompts, Math500TemplateAndAnswer) {
  const std::string path = shared_data("math500/test.jsonl");
  PromptSource source = jsonl_source(path, "");
  source.template_text = "Problem: {problem}\nSolution:";
  source.answer_field = "answer";
  auto prompts = load_prompts(source, &tok512());
  ASSERT_EQ(prompts.size(), 500u);
  const json first = first_record(path);
  EXPECT_TRUE(starts_with(prompts[0].text, "Problem: "));
  EXPECT_EQ(prompts[0].text, "Problem: " + first["problem"].get<std::string>() + "\nSolution:");
  EXPECT_EQ(prompts[0].answer, first["answer"].get<std::string>());
  EXPECT_EQ(prompts[0].id, first["unique_id"].get<std::string>());
  expect_bos_and_round_trip({prompts[0]});
}

TEST(Prompts, Gsm8kAllQuestionsWithAnswers) {
  PromptSource source = jsonl_source(shared_data("gsm8k/test.jsonl"), "question");
  source.answer_field = "answer";
  auto prompts = load_prompts(source, &tok512());
  ASSERT_EQ(prompts.size(), 1319u);
  EXPECT_EQ(prompts[0].id, "test:0");
  EXPECT_EQ(prompts[1318].id, "test:1318");
  EXPECT_TRUE(starts_with(prompts[0].text, "Janet\u2019s ducks lay 16 eggs per day.")) << prompts[0].text;
  EXPECT_TRUE(ends_with(prompts[0].answer, "\n#### 18")) << prompts[0].answer;
  EXPECT_EQ(prompts[0].tokens[0], 1);
}

TEST(Prompts, Aime24NumericIdsAndAnswers) {
  const std::string path = shared_data("aime24/test.jsonl");
  PromptSource source = jsonl_source(path, "problem");
  source.answer_field = "answer";
  source.limit = 3;
  auto prompts = load_prompts(source, &tok512());
  ASSERT_EQ(prompts.size(), 3u);
  const json first = first_record(path);
  EXPECT_EQ(prompts[0].id, first["id"].dump());
  EXPECT_EQ(prompts[0].answer, first["answer"].get<std::string>());
  EXPECT_EQ(prompts[0].text, first["problem"].get<std::string>());
}

TEST(Prompts, HumanEvalFromGzip) {
  auto prompts = load_prompts(jsonl_source(shared_data("humaneval/HumanEval.jsonl.gz"), "prompt"), &tok512());
  ASSERT_EQ(prompts.size(), 164u);
  EXPECT_EQ(prompts[0].id, "HumanEval/0");
  EXPECT_EQ(prompts[163].id, "HumanEval/163");
  EXPECT_TRUE(starts_with(prompts[0].text, "from typing import List\n\n\ndef has_close_elements("));
  EXPECT_TRUE(ends_with(prompts[0].text, "\n    \"\"\"\n"));  // jsonl texts are kept verbatim
  expect_bos_and_round_trip(prompts);
}

TEST(Prompts, TinyStoriesSampleSplitsIntoFiveStories) {
  PromptSource source;
  source.kind = PromptKind::TextFile;
  source.path = shared_data("tinystories/tinystories_sample_cs336.txt");
  source.separator = "<|endoftext|>";
  auto prompts = load_prompts(source, &tok512());
  ASSERT_EQ(prompts.size(), 5u);
  EXPECT_EQ(ids_of(prompts), (Texts{"tinystories_sample_cs336:0", "tinystories_sample_cs336:1",
                                    "tinystories_sample_cs336:2", "tinystories_sample_cs336:3",
                                    "tinystories_sample_cs336:4"}));
  EXPECT_TRUE(starts_with(prompts[0].text, "Once upon a time there was a little boy named Ben."));
  EXPECT_TRUE(ends_with(prompts[4].text, "they could play together."));  // trimmed before the separator
  expect_bos_and_round_trip(prompts);
}

}  // namespace
}  // namespace kvdrift
