// The network: nodes (state, stake, QoS, models), the queue, and recent tasks with their
// verdicts, from GET /v1/network every 2 s.
import { ErrorBox, KeyField, Nav, State, apiJson, html, mount, shortId, usePoll } from "./common.js";
import { TaskTable } from "./tables.js";

function NodeRow({ node }) {
  return html`<tr class="node-row" data-node=${node.node_id} data-state=${node.state}>
    <td><a class="node-link" href=${`/nodes/${node.node_id}`} title=${node.node_id}>${shortId(node.node_id)}</a></td>
    <td><${State} state=${node.state} /></td>
    <td class="num">${node.stake}</td>
    <td class="num" title=${`${node.qos_samples} scored tasks, ${node.recent_timeouts} recent timeouts`}>
      ${node.qos === null ? "–" : node.qos.toFixed(2)}</td>
    <td class="models">${node.models.join(", ")}</td>
    <td>${node.device}</td>
    <td class="num">${node.last_seen_s_ago.toFixed(1)} s</td>
  </tr>`;
}

function Network() {
  const [data, error, reload] = usePoll(() => apiJson("/v1/network"), 2000);
  return html`
    <${Nav} page="network" />
    <main class="network">
      ${error && error.status === 401 && html`<${KeyField} onSaved=${reload} />`}
      <${ErrorBox} error=${error} />
      ${data &&
      html`
        <section class="summary">
          <span><strong class="live-count">${data.live}</strong> live nodes of ${data.nodes.length}</span>
          <span class="queue" data-source=${data.queue.source}>Queue: <strong class="queue-length">${data.queue.length}</strong>
            ${data.queue.source === "dispatcher" ? " (the dispatcher's count)" : " (waiting tasks this gateway saw)"}</span>
        </section>
        <h2>Nodes</h2>
        <table class="nodes">
          <thead><tr><th>Node</th><th>State</th><th>Stake</th><th>QoS</th><th>Models</th><th>Device</th><th>Last seen</th></tr></thead>
          <tbody>${data.nodes.map((n) => html`<${NodeRow} node=${n} />`)}</tbody>
        </table>
        <h2>Recent tasks</h2>
        <p class="muted">Tasks this gateway has seen since ${new Date(data.since * 1000).toLocaleString()}.</p>
        <${TaskTable} tasks=${data.recent_tasks} />
      `}
    </main>
  `;
}

mount(Network);
