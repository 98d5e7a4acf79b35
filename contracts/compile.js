#!/usr/bin/env node
// Compiles every contract in src/ with the pinned solc-js (package-lock.json) and writes
// artifacts/<Name>.json: ABI, creation and runtime bytecode, and the exact compiler version
// and settings. The output is byte-for-byte deterministic (no timestamps, no absolute paths,
// keys sorted), so a rebuild anywhere gives the committed files, and a test checks that.
//
//   npm ci && node compile.js              writes contracts/artifacts/
//   node compile.js --out /tmp/artifacts   writes elsewhere (the artifact test does this)
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const solc = require("solc");

const ROOT = __dirname;
const SRC = path.join(ROOT, "src");
const NODE_MODULES = path.join(ROOT, "node_modules");

// Fixed on purpose: solc-js's default EVM version follows the newest fork ("osaka" in
// 0.8.37), which py-evm (the embedded backend) does not run. Cancun is the newest fork
// that py-evm, anvil and every mainstream chain all execute.
const SETTINGS = {
  evmVersion: "cancun",
  optimizer: { enabled: true, runs: 200 },
  viaIR: false,
  metadata: { bytecodeHash: "ipfs" },
};
const OUTPUTS = ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"];

function parseArgs(argv) {
  let out = path.join(ROOT, "artifacts");
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--out" && i + 1 < argv.length) {
      out = path.resolve(argv[++i]);
    } else {
      throw new Error(`compile.js: unknown argument ${JSON.stringify(argv[i])} (usage: node compile.js [--out DIR])`);
    }
  }
  return { out };
}

// Source names are paths relative to contracts/ ("src/TaskPayment.sol") or npm package paths
// ("@openzeppelin/contracts/..."): never absolute, so the metadata hash in the bytecode is
// the same on every machine.
function findImports(importPath) {
  if (importPath.startsWith("src/")) {
    return { contents: fs.readFileSync(path.join(ROOT, importPath), "utf8") };
  }
  const file = path.join(NODE_MODULES, importPath);
  if (!file.startsWith(NODE_MODULES + path.sep) || !fs.existsSync(file)) {
    return { error: `import ${JSON.stringify(importPath)} not found in ${NODE_MODULES} (run npm ci in contracts/)` };
  }
  return { contents: fs.readFileSync(file, "utf8") };
}

function sortKeys(value) {
  if (Array.isArray(value)) return value.map(sortKeys);
  if (value !== null && typeof value === "object") {
    const sorted = {};
    for (const key of Object.keys(value).sort()) sorted[key] = sortKeys(value[key]);
    return sorted;
  }
  return value;
}

function main() {
  const { out } = parseArgs(process.argv.slice(2));
  const files = fs.readdirSync(SRC).filter((f) => f.endsWith(".sol")).sort();
  if (files.length === 0) throw new Error(`compile.js: no .sol files in ${SRC}`);
  const sources = {};
  for (const f of files) sources[`src/${f}`] = { content: fs.readFileSync(path.join(SRC, f), "utf8") };

  const outputSelection = {};
  for (const name of Object.keys(sources)) outputSelection[name] = { "*": OUTPUTS };
  const input = { language: "Solidity", sources, settings: { ...SETTINGS, outputSelection } };
  const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));

  const problems = output.errors || [];
  for (const p of problems) process.stderr.write(p.formattedMessage || p.message);
  if (problems.some((p) => p.severity === "error")) {
    process.exitCode = 1;
    return;
  }

  fs.mkdirSync(out, { recursive: true });
  const version = solc.version();
  let count = 0;
  for (const sourceName of Object.keys(output.contracts).sort()) {
    for (const name of Object.keys(output.contracts[sourceName]).sort()) {
      const c = output.contracts[sourceName][name];
      if (!c.evm.bytecode.object) continue; // interfaces and abstract contracts
      const artifact = sortKeys({
        contractName: name,
        sourceName,
        abi: c.abi,
        bytecode: "0x" + c.evm.bytecode.object,
        deployedBytecode: "0x" + c.evm.deployedBytecode.object,
        compiler: { name: "solc", version, settings: SETTINGS },
      });
      fs.writeFileSync(path.join(out, `${name}.json`), JSON.stringify(artifact, null, 2) + "\n");
      count++;
    }
  }
  process.stdout.write(`compile.js: ${count} artifacts from ${files.length} sources (solc ${version}, evm ${SETTINGS.evmVersion}) -> ${out}\n`);
}

main();
