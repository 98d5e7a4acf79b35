// One node: its state, recent tasks with its verdicts, QoS window and history, earnings and
// slashes, from GET /v1/nodes/{node_id} every 3 s.
import { ErrorBox, KeyField, Nav, State, apiJson, html, mount, usePoll } from "./common.js";
import { TaskTable } from "./tables.js";

const nodeId = decodeURIComponent(location.pathname.split("/")[2] || "");

function QosWindow({ window }) {
  if (!window.length) return html`<p class="muted">The validator has scored no task of this node yet.</p>`;
  return html`<p class="muted">The validator's scores of its last ${window.length} tasks (0 to 10, oldest first).</p>
    <div class="qos-window" role="img" aria-label="QoS scores of the last tasks">
    ${window.map(
      (s) => html`<span class=${`bar verdict-${s.verdict}`} style=${`height:${Math.max(4, s.score * 10)}%`}
        title=${`${s.task_id}: ${s.verdict}, score ${s.score}`}></span>`,
    )}
  </div>`;
}

function Chain({ chain, title, total, rows, kind }) {
  if (!chain)
    return html`<p class="muted no-chain">This network runs no chain: nothing is paid on chain and no stake is slashed.</p>`;
  return html`<p>${title}: <strong class=${`${kind}-total`}>${total}</strong></p>
    ${rows.length === 0
      ? html`<p class="muted">None seen.</p>`
      : html`<table class=${kind}><thead><tr><th>Task</th><th>Amount</th><th>Block</th><th>Transaction</th></tr></thead>
          <tbody>${rows.map(
            (r) => html`<tr><td><code title=${r.task_key}>${r.task_id || r.task_key.slice(0, 12) + "…"}</code></td>
              <td class="num">${r.amount}</td><td class="num">${r.block_number}</td><td><code>${r.tx_hash.slice(0, 12)}…</code></td></tr>`,
          )}</tbody></table>`}`;
}

function Node() {
  const [data, error, reload] = usePoll(() => apiJson(`/v1/nodes/${encodeURIComponent(nodeId)}`), 3000);
  const node = data && data.node;
  return html`
    <${Nav} page="node" />
    <main class="node-page" data-node=${nodeId}>
      <h1>Node <code>${nodeId}</code></h1>
      ${error && error.status === 401 && html`<${KeyField} onSaved=${reload} />`}
      <${ErrorBox} error=${error} />
      ${data &&
      html`
        ${node
          ? html`<dl class="node-info">
              <dt>State</dt><dd><${State} state=${node.state} /></dd>
              <dt>Stake</dt><dd>${node.stake}</dd>
              <dt>Operator</dt><dd><code>${node.operator}</code></dd>
              <dt>Device</dt><dd>${node.device}</dd>
              <dt>Models</dt><dd class="models">${node.models.join(", ")}</dd>
              <dt>QoS</dt><dd>${node.qos === null ? "no score yet" : `${node.qos.toFixed(2)} over ${node.qos_samples} tasks`}${`, ${node.recent_timeouts} recent timeouts`}${node.paused ? " (paused: the validator probes it)" : ""}</dd>
            </dl>`
          : html`<p class="muted">This node is no longer in the directory.</p>`}
        <h2>Recent tasks</h2>
        <${TaskTable} tasks=${data.recent_tasks} only=${nodeId} />
        <h2>QoS</h2>
        <${QosWindow} window=${data.qos_window} />
        ${data.qos_history.length > 0 &&
        html`<table class="qos-history"><thead><tr><th>When</th><th>QoS</th><th>Tasks</th><th>Timeouts</th><th>After</th></tr></thead>
          <tbody>${data.qos_history.slice().reverse().map(
            (p) => html`<tr><td>${new Date(p.at * 1000).toLocaleTimeString()}</td><td class="num">${p.qos.toFixed(2)}</td>
              <td class="num">${p.samples}</td><td class="num">${p.recent_timeouts}</td><td><code>${p.task_id}</code></td></tr>`,
          )}</tbody></table>`}
        <h2>Earnings</h2>
        <${Chain} chain=${data.chain} title="Earned" total=${data.earnings.total} rows=${data.earnings.recent} kind="earnings" />
        <h2>Slashes</h2>
        <${Chain} chain=${data.chain} title="Slashed" total=${data.slashes.total} rows=${data.slashes.recent} kind="slashes" />
      `}
    </main>
  `;
}

mount(Node);
