// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";

/// @title Node staking
/// @notice A node joins the network by staking at least `minimumStake` tokens, with its own
/// tokens (`stake`) or with its operator's (`stakeFor`): whoever pays owns the stake, and the
/// owner is the node's operator (a node that staked for itself is its own owner). One node has
/// one owner at a time: another address cannot add to it. It leaves in two steps:
/// `requestUnstake` starts a cooldown during which the stake can still be slashed (a wrong
/// result found late still costs it), then `withdraw` returns what is left to the owner. The
/// validator role slashes a node's stake to the treasury when its result was wrong.
contract NodeStaking is AccessControl, ReentrancyGuard {
    using SafeERC20 for IERC20;

    bytes32 public constant VALIDATOR_ROLE = keccak256("VALIDATOR_ROLE");

    struct Stake {
        uint256 amount;
        /// When `withdraw` becomes possible; 0 while the node has not asked to unstake.
        uint64 unstakeAt;
        /// Who staked for the node and gets the stake back (the node itself when it staked
        /// for itself); 0 while nobody holds a stake for it. Shares a slot with `unstakeAt`.
        address owner;
    }

    IERC20 public immutable token;
    uint256 public immutable minimumStake;
    uint64 public immutable cooldown;
    address public immutable treasury;

    mapping(address node => Stake) private _stakes;
    mapping(bytes32 taskId => mapping(address node => bool)) private _slashedFor;

    event Staked(address indexed node, address indexed owner, uint256 amount, uint256 total);
    event UnstakeRequested(address indexed node, address indexed owner, uint256 amount, uint64 availableAt);
    event Withdrawn(address indexed node, address indexed owner, uint256 amount);
    event Slashed(address indexed node, uint256 amount, bytes32 indexed taskId, uint256 remaining);

    error ZeroAddress(string what);
    error ZeroAmount();
    error StakeBelowMinimum(uint256 total, uint256 minimum);
    error UnstakePending(address node, uint64 availableAt);
    error NotStaked(address node);
    error UnstakeNotRequested(address node);
    error CooldownNotOver(address node, uint64 availableAt, uint256 blockTime);
    error SlashExceedsStake(address node, uint256 amount, uint256 staked);
    error AlreadySlashed(address node, bytes32 taskId);
    error NotStakeOwner(address node, address caller, address owner);

    /// @param admin gets DEFAULT_ADMIN_ROLE and VALIDATOR_ROLE (grant the latter to the validator's key).
    /// @param minimum_ the least stake a node must hold to be active.
    /// @param cooldown_ seconds between `requestUnstake` and the earliest `withdraw`.
    /// @param treasury_ receives slashed tokens.
    constructor(IERC20 token_, address admin, uint256 minimum_, uint64 cooldown_, address treasury_) {
        if (address(token_) == address(0)) revert ZeroAddress("token");
        if (admin == address(0)) revert ZeroAddress("admin");
        if (treasury_ == address(0)) revert ZeroAddress("treasury");
        token = token_;
        minimumStake = minimum_;
        cooldown = cooldown_;
        treasury = treasury_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(VALIDATOR_ROLE, admin);
    }

    /// @notice Adds `amount` to the caller's own stake (pulled with transferFrom: approve first);
    /// the caller is the node and its own owner. The total after it must reach the minimum; a
    /// node that asked to unstake cannot add; a node another address owns cannot add either.
    function stake(uint256 amount) external nonReentrant {
        _stake(msg.sender, msg.sender, amount);
    }

    /// @notice Adds `amount` of the caller's tokens to `node`'s stake (approve first): the
    /// caller, the node's operator, owns the stake and gets it back. The same rules as `stake`;
    /// a node that staked for itself or is owned by another address is not the caller's to add to.
    function stakeFor(address node, uint256 amount) external nonReentrant {
        if (node == address(0)) revert ZeroAddress("node");
        _stake(node, msg.sender, amount);
    }

    /// @notice Starts the cooldown of the caller's own stake (a node that is its own owner).
    function requestUnstake() external {
        _requestUnstake(msg.sender);
    }

    /// @notice Starts the cooldown of `node`'s stake; only its owner may (the node itself when
    /// it staked for itself). The node is inactive from now on and its owner may withdraw after it.
    function requestUnstakeFor(address node) external {
        _requestUnstake(node);
    }

    /// @notice Returns the caller's whole remaining stake to it once the cooldown is over (a
    /// node that is its own owner).
    function withdraw() external nonReentrant {
        _withdraw(msg.sender);
    }

    /// @notice Returns `node`'s whole remaining stake to its owner once the cooldown is over;
    /// only the owner may call it. The node has no owner afterwards: anyone may stake for it again.
    function withdrawFor(address node) external nonReentrant {
        _withdraw(node);
    }

    /// @notice Takes `amount` of `node`'s stake to the treasury for the task `taskId`.
    /// Works during the cooldown too; never more than the node holds; once per node and task.
    function slash(address node, uint256 amount, bytes32 taskId) external onlyRole(VALIDATOR_ROLE) nonReentrant {
        if (amount == 0) revert ZeroAmount();
        if (_slashedFor[taskId][node]) revert AlreadySlashed(node, taskId);
        _slashedFor[taskId][node] = true;
        Stake storage s = _stakes[node];
        uint256 staked = s.amount;
        if (amount > staked) revert SlashExceedsStake(node, amount, staked);
        uint256 remaining = staked - amount;
        s.amount = remaining;
        token.safeTransfer(treasury, amount);
        emit Slashed(node, amount, taskId, remaining);
    }

    /// @notice Whether `node` was slashed for `taskId` already.
    function slashedFor(address node, bytes32 taskId) external view returns (bool) {
        return _slashedFor[taskId][node];
    }

    /// @notice Tokens `node` has staked (including during the cooldown).
    function stakeOf(address node) external view returns (uint256) {
        return _stakes[node].amount;
    }

    /// @notice When `node` may withdraw; 0 when it has not asked to unstake.
    function unstakeAvailableAt(address node) external view returns (uint64) {
        return _stakes[node].unstakeAt;
    }

    /// @notice Who owns `node`'s stake (its operator; `node` itself when it staked for itself);
    /// the zero address when nobody holds a stake for it.
    function ownerOf(address node) external view returns (address) {
        return _stakes[node].owner;
    }

    /// @notice Whether `node` may take tasks: it holds at least the minimum and is not leaving.
    function isActive(address node) external view returns (bool) {
        Stake memory s = _stakes[node];
        return s.unstakeAt == 0 && s.amount >= minimumStake && s.amount != 0;
    }

    function _stake(address node, address owner, uint256 amount) private {
        if (amount == 0) revert ZeroAmount();
        Stake storage s = _stakes[node];
        if (s.owner != address(0) && s.owner != owner) revert NotStakeOwner(node, owner, s.owner);
        if (s.unstakeAt != 0) revert UnstakePending(node, s.unstakeAt);
        uint256 total = s.amount + amount;
        if (total < minimumStake) revert StakeBelowMinimum(total, minimumStake);
        s.amount = total;
        s.owner = owner;
        token.safeTransferFrom(owner, address(this), amount);
        emit Staked(node, owner, amount, total);
    }

    /// A stake is held while it has an owner, even slashed down to nothing: its owner can
    /// still unstake it, which frees the node for another owner.
    function _requestUnstake(address node) private {
        Stake storage s = _stakes[node];
        if (s.owner == address(0)) revert NotStaked(node);
        if (s.owner != msg.sender) revert NotStakeOwner(node, msg.sender, s.owner);
        if (s.unstakeAt != 0) revert UnstakePending(node, s.unstakeAt);
        uint64 availableAt = uint64(block.timestamp) + cooldown;
        s.unstakeAt = availableAt;
        emit UnstakeRequested(node, s.owner, s.amount, availableAt);
    }

    function _withdraw(address node) private {
        Stake memory s = _stakes[node];
        if (s.owner != address(0) && s.owner != msg.sender) revert NotStakeOwner(node, msg.sender, s.owner);
        if (s.unstakeAt == 0) revert UnstakeNotRequested(node);
        if (block.timestamp < s.unstakeAt) revert CooldownNotOver(node, s.unstakeAt, block.timestamp);
        delete _stakes[node];
        if (s.amount != 0) token.safeTransfer(s.owner, s.amount);
        emit Withdrawn(node, s.owner, s.amount);
    }
}
