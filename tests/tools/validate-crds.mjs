#!/usr/bin/env node
// Validate the custom resources in Kubernetes YAML files (multi-document) against the schemas that
// the npm packages @kubernetes-models/keda and @kubernetes-models/prometheus-operator publish.
//
//   node tests/tools/validate-crds.mjs FILE...        (or "-" for stdin)
//
// Two passes, because a CRD schema alone is lenient:
//  1. the packages' JSON-schema validators (types, enums, required fields, patterns);
//  2. unknown fields: the API server rejects them (kubectl's default --validate=strict), but these
//     schemas do not forbid them, so the documents are type-checked with TypeScript against the
//     packages' own type declarations, whose excess-property check catches a misspelt field.
// Built-in kinds are left to kubernetes-validate; a kind of these API groups that this script does
// not know is an error, never a silent pass. Prints one line per document; exits 1 on any error.
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseAllDocuments } from "yaml";

const here = path.dirname(fileURLToPath(import.meta.url));

// apiVersion -> kinds checked here; each kind's module holds a JS model with the schema validator and a .d.ts.
// Imported lazily: loading every model of both packages costs seconds.
const KNOWN = {
  "keda.sh/v1alpha1": ["ScaledObject", "ScaledJob", "TriggerAuthentication", "ClusterTriggerAuthentication"],
  "monitoring.coreos.com/v1": ["ServiceMonitor", "PodMonitor", "PrometheusRule"],
};
const PACKAGE = { "keda.sh": "@kubernetes-models/keda", "monitoring.coreos.com": "@kubernetes-models/prometheus-operator" };
function moduleOf(apiVersion, kind) {
  if (!KNOWN[apiVersion]?.includes(kind)) return null;
  return `${PACKAGE[apiVersion.split("/")[0]]}/${apiVersion}/${kind}`;
}

function docsOf(file) {
  const text = fs.readFileSync(file === "-" ? 0 : file, "utf8");
  const out = [];
  for (const doc of parseAllDocuments(text)) {
    if (doc.errors.length) throw new Error(`${file}: YAML: ${doc.errors[0].message}`);
    const data = doc.toJS();
    if (data !== null && data !== undefined) out.push(data);
  }
  return out;
}

const MINI_LIB = `
declare global {
  interface Array<T> { length: number; [n: number]: T }
  interface Boolean {} interface Function {} interface CallableFunction {} interface NewableFunction {}
  interface IArguments {} interface Number {} interface Object {} interface RegExp {} interface String {}
}
`;

// Pass 2: one `const dN: IKind = {...};` per document, compiled in memory (nothing written to disk).
async function unknownFields(checked) {
  if (!checked.length) return new Map();
  const ts = (await import("typescript")).default;
  const imports = new Set();
  const lines = [];
  checked.forEach(({ data, kind, module }, i) => {
    imports.add(`import type { I${kind} } from "${module}";`);
    lines.push(`export const d${i}: I${kind} = ${JSON.stringify(data)};`);
  });
  const header = [...imports];
  const source = [...header, ...lines].join("\n") + "\n" + MINI_LIB;
  const fileName = path.join(here, "__crd_check__.ts");
  const options = {
    strict: true,
    noEmit: true,
    skipLibCheck: true,
    module: ts.ModuleKind.NodeNext,
    moduleResolution: ts.ModuleResolutionKind.NodeNext,
    target: ts.ScriptTarget.ES2022,
    types: [],
    // The standard library's declarations take most of the compile time and none of them is needed
    // beyond the few global types below (the models use Array<T> and primitives only).
    noLib: true,
  };
  const host = ts.createCompilerHost(options);
  const getSourceFile = host.getSourceFile.bind(host);
  host.getSourceFile = (name, lang, ...rest) =>
    path.resolve(name) === fileName ? ts.createSourceFile(name, source, lang) : getSourceFile(name, lang, ...rest);
  const fileExists = host.fileExists.bind(host);
  host.fileExists = (name) => path.resolve(name) === fileName || fileExists(name);
  const program = ts.createProgram([fileName], options, host);
  const problems = new Map();
  for (const d of ts.getPreEmitDiagnostics(program)) {
    const message = ts.flattenDiagnosticMessageText(d.messageText, "\n");
    if (!d.file || path.resolve(d.file.fileName) !== fileName) {
      throw new Error(`type declarations did not load: ${message}`);
    }
    const line = d.file.getLineAndCharacterOfPosition(d.start).line - header.length;
    if (line < 0) throw new Error(`type declarations did not load: ${message}`);
    if (!problems.has(line)) problems.set(line, []);
    problems.get(line).push(message);
  }
  return problems;
}

async function main(files) {
  if (!files.length) {
    console.error("usage: validate-crds.mjs FILE... (- for stdin)");
    return 2;
  }
  const results = []; // [name, error message or null], in document order
  const checked = [];
  for (const file of files) {
    for (const data of docsOf(file)) {
      const { apiVersion = "", kind = "" } = data;
      const name = `${kind}/${data.metadata?.name ?? "?"} (${file})`;
      const module = moduleOf(apiVersion, kind);
      if (!module) {
        if (PACKAGE[apiVersion.split("/")[0]]) results.push([name, `no schema here for ${apiVersion} ${kind}`]);
        else console.log(`skip ${name}: not a custom resource checked here`);
        continue;
      }
      const result = [name, null];
      results.push(result);
      try {
        const Model = (await import(module))[kind];
        new Model(data).validate();
        checked.push({ result, data, kind, module });
      } catch (err) {
        result[1] = err.message;
      }
    }
  }
  const problems = await unknownFields(checked);
  checked.forEach(({ result }, i) => {
    if (problems.has(i)) result[1] = problems.get(i).join("; ");
  });
  for (const [name, error] of results) console.log(error ? `error ${name}: ${error}` : `ok ${name}`);
  return results.some(([, error]) => error) ? 1 : 0;
}

try {
  process.exitCode = await main(process.argv.slice(2));
} catch (err) {
  console.error(`validate-crds: ${err.message}`);
  process.exitCode = 2;
}
