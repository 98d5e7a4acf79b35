// The recent-tasks table of the network and node pages.
import { Verdict, ago, html, shortId } from "./common.js";

export function TaskRow({ task, only }) {
  const nodes = only ? task.nodes.filter((n) => n === only) : task.nodes;
  return html`<tr class="task-row" data-task=${task.task_id} data-status=${task.status}>
    <td><code title=${task.task_id}>${shortId(task.task_id)}</code></td>
    <td>${task.model || "?"}</td>
    <td><span class=${`status status-${task.status}`}>${task.status}</span></td>
    <td class="verdicts">
      ${nodes.map(
        (n) => html`<span class="node-verdict">
          ${only ? "" : html`<a href=${`/nodes/${n}`} title=${n}>${shortId(n)}</a> `}
          ${task.verdicts[n] ? html`<${Verdict} verdict=${task.verdicts[n]} />` : html`<span class="muted">…</span>`}
          ${task.qos[n] !== undefined && html` <span class="qos" title="QoS score">${task.qos[n]}</span>`}
        </span>`,
      )}
    </td>
    <td>${task.reason}</td>
    <td>${ago(task.submitted_at || task.finished_at)}</td>
  </tr>`;
}

export function TaskTable({ tasks, only }) {
  if (!tasks.length) return html`<p class="muted">No task seen yet.</p>`;
  return html`<table class="tasks">
    <thead><tr><th>Task</th><th>Model</th><th>Status</th><th>${only ? "Verdict, QoS" : "Nodes: verdict, QoS"}</th>
      <th>Reason</th><th>When</th></tr></thead>
    <tbody>${tasks.map((t) => html`<${TaskRow} task=${t} only=${only} />`)}</tbody>
  </table>`;
}
