// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {Math} from "@openzeppelin/contracts/utils/math/Math.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";

/// @title Task payment
/// @notice Apps deposit tokens into a balance here. When the gateway accepts a task it moves
/// the task's fee from the app's balance into escrow. When the task is done the settler pays
/// the fee to the task's nodes by their QoS shares (credited to the nodes' balances here, which
/// they withdraw like any balance); when it is aborted the settler refunds the fee to the app.
/// Each task ends exactly once: settled or refunded, never both, never twice.
///
/// Rounding: node i gets floor(fee * shares[i] / sum(shares)); the dust left by the floors
/// (less than the number of nodes, in the token's smallest unit) goes to the first node, so
/// every escrowed unit is paid out and the contract never holds unowned tokens.
contract TaskPayment is AccessControl, ReentrancyGuard {
    using SafeERC20 for IERC20;

    /// Escrows fees when tasks are accepted (the gateway's key).
    bytes32 public constant GATEWAY_ROLE = keccak256("GATEWAY_ROLE");
    /// Settles and refunds tasks (the chain-indexer's key).
    bytes32 public constant SETTLER_ROLE = keccak256("SETTLER_ROLE");

    enum TaskState {
        None,
        Escrowed,
        Settled,
        Refunded
    }

    /// One storage slot per task.
    struct Task {
        address app;
        uint88 fee;
        TaskState state;
    }

    IERC20 public immutable token;

    mapping(address account => uint256) private _balances;
    mapping(bytes32 taskId => Task) private _tasks;
    /// Tokens held in escrow for open tasks, summed.
    uint256 public totalEscrowed;

    event Deposited(address indexed account, uint256 amount, uint256 balance);
    event Withdrawn(address indexed account, uint256 amount, uint256 balance);
    event Escrowed(bytes32 indexed taskId, address indexed app, uint256 fee);
    event Settled(bytes32 indexed taskId, address indexed app, uint256 fee, address[] nodes, uint256[] amounts);
    event Refunded(bytes32 indexed taskId, address indexed app, uint256 fee);

    error ZeroAddress(string what);
    error ZeroAmount();
    error InsufficientBalance(address account, uint256 balance, uint256 needed);
    error FeeTooLarge(uint256 fee, uint256 maximum);
    error TaskAlreadyEscrowed(bytes32 taskId);
    error TaskNotEscrowed(bytes32 taskId);
    error TaskAlreadySettled(bytes32 taskId);
    error TaskAlreadyRefunded(bytes32 taskId);
    error LengthMismatch(string what, uint256 expected, uint256 got);
    error NoNodes(bytes32 taskId);
    error ZeroShares(bytes32 taskId);

    /// @param admin gets DEFAULT_ADMIN_ROLE, GATEWAY_ROLE and SETTLER_ROLE (grant them to the services' keys).
    constructor(IERC20 token_, address admin) {
        if (address(token_) == address(0)) revert ZeroAddress("token");
        if (admin == address(0)) revert ZeroAddress("admin");
        token = token_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(GATEWAY_ROLE, admin);
        _grantRole(SETTLER_ROLE, admin);
    }

    /// @notice Adds `amount` to the caller's balance (pulled with transferFrom: approve first).
    function deposit(uint256 amount) external nonReentrant {
        if (amount == 0) revert ZeroAmount();
        uint256 balance = _balances[msg.sender] + amount;
        _balances[msg.sender] = balance;
        token.safeTransferFrom(msg.sender, address(this), amount);
        emit Deposited(msg.sender, amount, balance);
    }

    /// @notice Sends `amount` of the caller's balance (deposits, refunds, earnings) back to it.
    function withdraw(uint256 amount) external nonReentrant {
        if (amount == 0) revert ZeroAmount();
        uint256 balance = _balances[msg.sender];
        if (amount > balance) revert InsufficientBalance(msg.sender, balance, amount);
        balance -= amount;
        _balances[msg.sender] = balance;
        token.safeTransfer(msg.sender, amount);
        emit Withdrawn(msg.sender, amount, balance);
    }

    /// @notice Moves `fee` from `app`'s balance into escrow for `taskId`. Once per task.
    function escrow(bytes32 taskId, address app, uint256 fee) external onlyRole(GATEWAY_ROLE) {
        _escrowOne(taskId, app, fee);
    }

    /// @notice `escrow` for many tasks in one transaction; reverts whole if any cannot be escrowed.
    function escrowMany(
        bytes32[] calldata taskIds,
        address[] calldata apps,
        uint256[] calldata fees
    ) external onlyRole(GATEWAY_ROLE) {
        uint256 n = taskIds.length;
        if (apps.length != n) revert LengthMismatch("apps", n, apps.length);
        if (fees.length != n) revert LengthMismatch("fees", n, fees.length);
        for (uint256 k = 0; k < n; ++k) {
            _escrowOne(taskIds[k], apps[k], fees[k]);
        }
    }

    function _escrowOne(bytes32 taskId, address app, uint256 fee) private {
        if (app == address(0)) revert ZeroAddress("app");
        if (fee > type(uint88).max) revert FeeTooLarge(fee, type(uint88).max);
        Task storage t = _tasks[taskId];
        if (t.state != TaskState.None) revert TaskAlreadyEscrowed(taskId);
        uint256 balance = _balances[app];
        if (fee > balance) revert InsufficientBalance(app, balance, fee);
        _balances[app] = balance - fee;
        totalEscrowed += fee;
        t.app = app;
        t.fee = uint88(fee);
        t.state = TaskState.Escrowed;
        emit Escrowed(taskId, app, fee);
    }

    /// @notice Pays each task's escrowed fee to its nodes by share: task `taskIds[k]` pays
    /// `nodes[k][i]` the part `shares[k][i] / sum(shares[k])` of its fee, the rounding dust to
    /// `nodes[k][0]`. Reverts whole if any task is not open (unknown, settled or refunded).
    function settle(
        bytes32[] calldata taskIds,
        address[][] calldata nodes,
        uint256[][] calldata shares
    ) external onlyRole(SETTLER_ROLE) {
        uint256 n = taskIds.length;
        if (nodes.length != n) revert LengthMismatch("nodes", n, nodes.length);
        if (shares.length != n) revert LengthMismatch("shares", n, shares.length);
        uint256 paid;
        for (uint256 k = 0; k < n; ++k) {
            paid += _settleOne(taskIds[k], nodes[k], shares[k]);
        }
        totalEscrowed -= paid;
    }

    /// @notice Returns each task's escrowed fee to its app's balance (aborted tasks).
    /// Reverts whole if any task is not open (unknown, settled or refunded).
    function refund(bytes32[] calldata taskIds) external onlyRole(SETTLER_ROLE) {
        uint256 refunded;
        for (uint256 k = 0; k < taskIds.length; ++k) {
            bytes32 taskId = taskIds[k];
            Task storage t = _tasks[taskId];
            _requireOpen(taskId, t.state);
            t.state = TaskState.Refunded;
            address app = t.app;
            uint256 fee = t.fee;
            _balances[app] += fee;
            refunded += fee;
            emit Refunded(taskId, app, fee);
        }
        totalEscrowed -= refunded;
    }

    /// @notice Tokens `account` can withdraw (an app's deposits less escrow, a node's earnings).
    function balanceOf(address account) external view returns (uint256) {
        return _balances[account];
    }

    /// @notice A task's app, escrowed fee and state (None for a task never escrowed).
    function taskOf(bytes32 taskId) external view returns (address app, uint256 fee, TaskState state) {
        Task memory t = _tasks[taskId];
        return (t.app, t.fee, t.state);
    }

    function _settleOne(
        bytes32 taskId,
        address[] calldata nodes,
        uint256[] calldata shares
    ) private returns (uint256 fee) {
        uint256 m = nodes.length;
        if (m == 0) revert NoNodes(taskId);
        if (shares.length != m) revert LengthMismatch("shares of a task", m, shares.length);
        Task storage t = _tasks[taskId];
        _requireOpen(taskId, t.state);
        t.state = TaskState.Settled;
        fee = t.fee;

        uint256 total;
        for (uint256 i = 0; i < m; ++i) {
            if (nodes[i] == address(0)) revert ZeroAddress("node");
            total += shares[i];
        }
        if (total == 0) revert ZeroShares(taskId);

        uint256[] memory amounts = new uint256[](m);
        uint256 rest = fee;
        for (uint256 i = 1; i < m; ++i) {
            uint256 amount = Math.mulDiv(fee, shares[i], total);
            amounts[i] = amount;
            rest -= amount;
            _balances[nodes[i]] += amount;
        }
        amounts[0] = rest;
        _balances[nodes[0]] += rest;
        emit Settled(taskId, t.app, fee, nodes, amounts);
    }

    function _requireOpen(bytes32 taskId, TaskState state) private pure {
        if (state == TaskState.Escrowed) return;
        if (state == TaskState.None) revert TaskNotEscrowed(taskId);
        if (state == TaskState.Settled) revert TaskAlreadySettled(taskId);
        revert TaskAlreadyRefunded(taskId);
    }
}
