// A validator for the subset of JSON Schema (draft 2020-12) that query_sdk/manifest.py
// publishes in query_sdk/schemas/: the native SDK checks manifests against those very files
// (embedded at build time), so both SDKs read the formats from one definition.
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

namespace cmce {

// Throws Error(code, "<where>: <key path> <problem>, got <value>") unless `value` conforms.
void validate_schema(const nlohmann::json& schema, const nlohmann::json& value,
                     const std::string& where, int code);

// A JSON number the schema accepted as an integer (4 or 4.0) as int64.
int64_t json_integer(const nlohmann::json& value);

// The check of a "created" time that its schema pattern cannot make: the date exists
// (2024-02-30 does not; year 0 neither), as Python's datetime.fromisoformat decides.
bool real_date(const std::string& utc_time);

// The embedded published schemas by file name ("gallery-manifest.schema.json", ...).
const nlohmann::json& published_schema(const std::string& name);

}  // namespace cmce
