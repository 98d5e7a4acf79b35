// Strict offline check of monitoring.coreos.com/v1 objects (PodMonitor, PrometheusRule, ...).
//
//   node deploy/tools/check-crds.mjs < objects.json
//
// stdin: a JSON array of {"label": "...", "object": {...}}. stdout: a JSON array of
// failures {"index": i, "path": "spec.podMetricsEndpoints[0].bogus", "message": "..."}.
// Exit 0 when it could check (failures or not), 2 when it could not.
//
// Two checks per object, from @kubernetes-models/prometheus-operator (the operator's CRD
// schemas as JSON Schema and TypeScript interfaces):
// 1. the model's validate(): types, enums, patterns, required fields (ajv). It does not
//    reject unknown fields.
// 2. TypeScript's excess-property check: each object becomes a typed literal
//    `const o0: m.IPodMonitor = {...}` in one in-memory module, type-checked against the
//    package's .d.ts with the compiler API. An unknown field at any depth is an error.
// A kind the package has no model for is a failure, never a pass.

import path from "node:path";
import { fileURLToPath } from "node:url";
import ts from "typescript";
import * as v1 from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const API_VERSION = "monitoring.coreos.com/v1";
const MODULE = "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
const here = path.dirname(fileURLToPath(import.meta.url));
// Inside deploy/ so that module resolution finds deploy/node_modules; never written to disk.
const virtualFile = path.join(here, "__k8s_check_crds__.mts");

function readStdin() {
  return new Promise((resolve, reject) => {
    const chunks = [];
    process.stdin.on("data", (c) => chunks.push(c));
    process.stdin.on("end", () => resolve(Buffer.concat(chunks).toString("utf8")));
    process.stdin.on("error", reject);
  });
}

function shorten(text) {
  return text
    .replace(/IComGithubPrometheusOperatorPrometheusOperatorPkgApisMonitoringV1/g, "")
    .replace(/IIoK8sApimachineryPkgApis(Meta)?V1/g, "")
    .replace(/\s+/g, " ");
}

function jsonPointerToPath(pointer) {
  let out = "";
  for (const part of pointer.split("/").slice(1)) {
    const token = part.replace(/~1/g, "/").replace(/~0/g, "~");
    out += /^\d+$/.test(token) ? `[${token}]` : out ? `.${token}` : token;
  }
  return out || "(root)";
}

function modelCheck(kind, object) {
  try {
    new v1[kind](object).validate();
    return [];
  } catch (err) {
    const errors = err.errors ?? err.details;
    if (!Array.isArray(errors)) return [{ path: "(root)", message: String(err.message ?? err) }];
    return errors.map((e) => {
      let where = e.instancePath ?? "";
      if (e.keyword === "required" && e.params?.missingProperty) where += `/${e.params.missingProperty}`;
      const detail = e.params?.allowedValues ? ` ${JSON.stringify(e.params.allowedValues)}` : "";
      return { path: jsonPointerToPath(where), message: `${e.message}${detail}` };
    });
  }
}

// The field path of the AST node a diagnostic points at: names of the enclosing property
// assignments and indexes of the enclosing array elements, up to `const oN`.
function fieldPath(sourceFile, position) {
  let node = sourceFile;
  for (;;) {
    const child = node.forEachChild((c) => (c.getStart(sourceFile) <= position && position < c.end ? c : undefined));
    if (!child) break;
    node = child;
  }
  const parts = [];
  let index = -1;
  for (let n = node; n; n = n.parent) {
    if (ts.isPropertyAssignment(n)) parts.push(n.name.getText(sourceFile).replace(/^"|"$/g, ""));
    if (n.parent && ts.isArrayLiteralExpression(n.parent) && ts.isExpression(n)) {
      parts.push(`[${n.parent.elements.indexOf(n)}]`);
    }
    if (ts.isVariableDeclaration(n)) index = Number(n.name.getText(sourceFile).slice(1));
  }
  const p = parts.reverse().reduce((acc, part) => (part.startsWith("[") ? acc + part : acc ? `${acc}.${part}` : part), "");
  return { index, path: p || "(root)" };
}

function typeCheck(entries) {
  // entries: [{index, kind, object}] with a known kind
  const lines = [`import type * as m from "${MODULE}";`];
  for (const { index, kind, object } of entries) {
    lines.push(`export const o${index}: m.I${kind} = ${JSON.stringify(object, null, 2)};`);
  }
  const text = lines.join("\n") + "\n";
  const options = {
    strict: true,
    noEmit: true,
    skipLibCheck: true,
    target: ts.ScriptTarget.ES2022,
    module: ts.ModuleKind.NodeNext,
    moduleResolution: ts.ModuleResolutionKind.NodeNext,
    types: [],
    lib: ["lib.es2022.d.ts"],
  };
  const host = ts.createCompilerHost(options);
  const { getSourceFile, fileExists, readFile } = host;
  host.getSourceFile = (name, lang, ...rest) =>
    path.resolve(name) === virtualFile
      ? ts.createSourceFile(name, text, lang, true)
      : getSourceFile.call(host, name, lang, ...rest);
  host.fileExists = (name) => path.resolve(name) === virtualFile || fileExists.call(host, name);
  host.readFile = (name) => (path.resolve(name) === virtualFile ? text : readFile.call(host, name));
  const program = ts.createProgram([virtualFile], options, host);
  const sourceFile = program.getSourceFile(virtualFile);
  const diagnostics = [
    ...program.getOptionsDiagnostics(),
    ...program.getGlobalDiagnostics(),
    ...program.getSyntacticDiagnostics(sourceFile),
    ...program.getSemanticDiagnostics(sourceFile),
  ];
  const failures = [];
  for (const d of diagnostics) {
    const message = shorten(ts.flattenDiagnosticMessageText(d.messageText, " "));
    if (d.file !== sourceFile || d.start === undefined) {
      throw new Error(`TypeScript could not check the objects: ${message}`);
    }
    const { index, path: where } = fieldPath(sourceFile, d.start);
    if (index < 0) throw new Error(`TypeScript could not check the objects: ${message}`);
    failures.push({ index, path: where, message: `TS${d.code}: ${message}` });
  }
  return failures;
}

async function main() {
  const items = JSON.parse(await readStdin());
  const failures = [];
  const typed = [];
  items.forEach(({ object }, index) => {
    const kind = object?.kind;
    if (object?.apiVersion !== API_VERSION || typeof kind !== "string" || typeof v1[kind] !== "function") {
      failures.push({ index, path: "kind", message: `no schema for ${object?.apiVersion} ${kind} in ${MODULE}` });
      return;
    }
    for (const f of modelCheck(kind, object)) failures.push({ index, ...f });
    typed.push({ index, kind, object });
  });
  if (typed.length) failures.push(...typeCheck(typed));
  failures.sort((a, b) => a.index - b.index || a.path.localeCompare(b.path));
  process.stdout.write(JSON.stringify(failures) + "\n");
}

main().catch((err) => {
  process.stderr.write(`check-crds: ${err.stack ?? err}\n`);
  process.exit(2);
});
