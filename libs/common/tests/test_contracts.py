"""The contracts on a real EVM: every function, every revert, the events.

One abstract suite (`ContractSuite`) runs against each backend: the in-process EVM
(eth-tester on py-evm, the embedded default) and anvil from the npm package in
contracts/node_modules (marked `integration`). The contracts are deployed once per
backend; each test runs inside a chain snapshot that is reverted after it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from eth_account import Account
from web3 import Web3

from stipple_common import chain as ch
from stipple_common.chain import ContractReverted, Settlement, StippleChain, TaskState

MIN_STAKE = 1_000
COOLDOWN_S = 3_600
START_TOKENS = 1_000_000


@dataclass
class Env:
    """One deployment and the accounts the tests play with."""

    w3: Web3
    chain: StippleChain
    admin: str
    nodes: list[str]
    app: str
    stranger: str
    validator: str
    gateway: str
    settler: str
    treasury: str


def reverted(error: str) -> pytest.RaisesExc[ContractReverted]:
    """pytest.raises for a revert with the custom error `error`."""
    return pytest.raises(ContractReverted, match=rf"reverted: {error}\(")


def names(events: list[ch.ChainEvent]) -> list[str]:
    return [e.name for e in events]


def one(events: list[ch.ChainEvent], name: str) -> ch.ChainEvent:
    found = [e for e in events if e.name == name]
    assert len(found) == 1, f"expected one {name} event, got {names(events)}"
    return found[0]


class ContractSuite:
    """Every contract test; subclasses provide the `w3` fixture for their backend."""

    @pytest.fixture(scope="class")
    @classmethod
    def w3(cls) -> Web3:
        raise NotImplementedError

    @pytest.fixture(scope="class")
    @classmethod
    def deployed(cls, w3: Web3) -> Env:
        a = w3.eth.accounts
        admin, nodes, app, stranger = a[0], [a[1], a[2], a[3]], a[4], a[5]
        validator, gateway, settler, treasury = a[6], a[7], a[8], a[9]
        deployment = ch.deploy_all(
            w3,
            admin,
            min_stake=MIN_STAKE,
            cooldown_s=COOLDOWN_S,
            treasury=treasury,
            validator=validator,
            gateway=gateway,
            settler=settler,
        )
        chain = StippleChain(w3, deployment)
        for account in [*nodes, app, stranger]:
            chain.mint(admin, account, START_TOKENS)
        return Env(w3, chain, admin, nodes, app, stranger, validator, gateway, settler, treasury)

    @pytest.fixture
    def env(self, w3: Web3, deployed: Env) -> Iterator[Env]:
        snap = ch.snapshot(w3)
        yield deployed
        ch.revert(w3, snap)

    def escrowed(self, env: Env, *task_ids: str, fee: int = 100) -> None:
        env.chain.deposit(env.app, fee * len(task_ids))
        for task_id in task_ids:
            env.chain.escrow(env.gateway, task_id, env.app, fee)

    def assert_payment_solvent(self, env: Env) -> None:
        """The payment contract holds exactly the balances plus the escrow: no token lost or made."""
        c = env.chain
        accounts = [env.admin, *env.nodes, env.app, env.stranger, env.treasury]
        owed = sum(c.balance_of(x) for x in accounts) + c.total_escrowed()
        assert c.token_balance(env.chain.deployment.payment) == owed

    # ------------------------------------------------------------ deployment and token

    def test_deploy_wires_the_contracts_and_roles(self, env: Env) -> None:
        c = env.chain
        assert c.minimum_stake() == MIN_STAKE
        assert c.cooldown_s() == COOLDOWN_S
        assert c.treasury() == env.treasury
        assert c.staking.functions.token().call() == c.deployment.token
        assert c.payment.functions.token().call() == c.deployment.token
        assert c.has_role("NodeStaking", "VALIDATOR_ROLE", env.validator)
        assert c.has_role("TaskPayment", "GATEWAY_ROLE", env.gateway)
        assert c.has_role("TaskPayment", "SETTLER_ROLE", env.settler)
        assert not c.has_role("TaskPayment", "SETTLER_ROLE", env.gateway)
        for contract in ch.CONTRACT_NAMES:
            assert c.has_role(contract, "DEFAULT_ADMIN_ROLE", env.admin)
        assert ch.Deployment.from_dict(c.deployment.to_dict()) == c.deployment

    def test_deploy_with_zero_treasury_reverts(self, env: Env) -> None:
        with reverted("ZeroAddress"):
            ch.deploy_all(env.w3, env.admin, min_stake=1, cooldown_s=1, treasury="0x" + "00" * 20)

    def test_token_is_an_erc20_minted_by_the_minter(self, env: Env) -> None:
        c = env.chain
        assert c.token.functions.symbol().call() == "STPL"
        assert c.token.functions.decimals().call() == 18
        receipt = c.mint(env.admin, env.stranger, 5)
        assert one(c.events(receipt), "Transfer").args["value"] == 5
        assert c.token_balance(env.stranger) == START_TOKENS + 5
        c.transfer(env.stranger, env.app, 7)
        assert c.token_balance(env.app) == START_TOKENS + 7

    def test_mint_by_other_than_the_minter_reverts(self, env: Env) -> None:
        with reverted("AccessControlUnauthorizedAccount") as info:
            env.chain.mint(env.stranger, env.stranger, 1)
        assert info.value.error == "AccessControlUnauthorizedAccount"
        assert info.value.args_by_name["account"] == env.stranger
        assert info.value.to_dict()["code"] == "contract_reverted"

    def test_granting_a_role_needs_the_admin(self, env: Env) -> None:
        with reverted("AccessControlUnauthorizedAccount"):
            env.chain.grant_role(env.stranger, "StippleToken", "MINTER_ROLE", env.stranger)
        env.chain.grant_role(env.admin, "StippleToken", "MINTER_ROLE", env.stranger)
        env.chain.mint(env.stranger, env.stranger, 1)

    # ------------------------------------------------------------ staking

    def test_stake_emits_staked_and_makes_the_node_active(self, env: Env) -> None:
        c, node = env.chain, env.nodes[0]
        assert not c.is_active(node)
        receipt = c.stake(node, MIN_STAKE)
        event = one(c.events(receipt), "Staked")
        assert event.contract == "NodeStaking"
        assert event.args == {"node": node, "owner": node, "amount": MIN_STAKE, "total": MIN_STAKE}
        assert c.stake_of(node) == MIN_STAKE
        assert c.is_active(node)
        assert c.token_balance(node) == START_TOKENS - MIN_STAKE

    def test_stake_below_the_minimum_reverts(self, env: Env) -> None:
        with reverted("StakeBelowMinimum") as info:
            env.chain.stake(env.nodes[0], MIN_STAKE - 1)
        assert info.value.args_by_name == {"total": MIN_STAKE - 1, "minimum": MIN_STAKE}

    def test_stake_tops_up_above_the_minimum(self, env: Env) -> None:
        c, node = env.chain, env.nodes[0]
        c.stake(node, MIN_STAKE)
        receipt = c.stake(node, 1)
        assert one(c.events(receipt), "Staked").args["total"] == MIN_STAKE + 1
        assert c.stake_of(node) == MIN_STAKE + 1

    def test_stake_of_zero_reverts(self, env: Env) -> None:
        with reverted("ZeroAmount"):
            env.chain.stake(env.nodes[0], 0)

    def test_stake_without_allowance_reverts(self, env: Env) -> None:
        with reverted("ERC20InsufficientAllowance"):
            env.chain.stake(env.nodes[0], MIN_STAKE, approve=False)

    def test_stake_with_a_local_key(self, env: Env) -> None:
        """A node agent stakes with its own key, signing locally (not an account the chain unlocks)."""
        c, key = env.chain, Account.create()
        env.w3.eth.send_transaction({"from": env.admin, "to": key.address, "value": 10**18})
        c.mint(env.admin, key.address, MIN_STAKE)
        with reverted("StakeBelowMinimum"):  # a revert on the local-key path decodes the same
            c.stake(key, MIN_STAKE - 1)
        c.stake(key, MIN_STAKE)
        assert c.is_active(key.address)
        c.request_unstake(key)
        assert not c.is_active(key.address)

    def test_request_unstake_starts_the_cooldown(self, env: Env) -> None:
        c, node = env.chain, env.nodes[0]
        c.stake(node, MIN_STAKE)
        receipt = c.request_unstake(node)
        event = one(c.events(receipt), "UnstakeRequested")
        now = env.w3.eth.get_block(receipt["blockNumber"])["timestamp"]
        assert event.args == {"node": node, "owner": node, "amount": MIN_STAKE, "availableAt": now + COOLDOWN_S}
        assert c.unstake_available_at(node) == now + COOLDOWN_S
        assert not c.is_active(node)
        assert c.stake_of(node) == MIN_STAKE

    def test_request_unstake_without_stake_reverts(self, env: Env) -> None:
        with reverted("NotStaked"):
            env.chain.request_unstake(env.stranger)

    def test_request_unstake_twice_reverts(self, env: Env) -> None:
        c, node = env.chain, env.nodes[0]
        c.stake(node, MIN_STAKE)
        c.request_unstake(node)
        with reverted("UnstakePending"):
            c.request_unstake(node)

    def test_stake_while_unstaking_reverts(self, env: Env) -> None:
        c, node = env.chain, env.nodes[0]
        c.stake(node, MIN_STAKE)
        c.request_unstake(node)
        with reverted("UnstakePending"):
            c.stake(node, MIN_STAKE)

    def test_withdraw_without_request_reverts(self, env: Env) -> None:
        c, node = env.chain, env.nodes[0]
        c.stake(node, MIN_STAKE)
        with reverted("UnstakeNotRequested"):
            c.withdraw_stake(node)

    def test_withdraw_before_the_cooldown_reverts(self, env: Env) -> None:
        c, node = env.chain, env.nodes[0]
        c.stake(node, MIN_STAKE)
        c.request_unstake(node)
        ch.increase_time(env.w3, COOLDOWN_S // 2)
        with reverted("CooldownNotOver") as info:
            c.withdraw_stake(node)
        assert info.value.args_by_name["availableAt"] == c.unstake_available_at(node)

    def test_withdraw_after_the_cooldown_returns_the_stake(self, env: Env) -> None:
        c, node = env.chain, env.nodes[0]
        c.stake(node, MIN_STAKE)
        c.request_unstake(node)
        ch.increase_time(env.w3, COOLDOWN_S + 1)
        receipt = c.withdraw_stake(node)
        assert one(c.events(receipt), "Withdrawn").args == {"node": node, "owner": node, "amount": MIN_STAKE}
        assert c.stake_of(node) == 0
        assert c.unstake_available_at(node) == 0
        assert c.token_balance(node) == START_TOKENS
        c.stake(node, MIN_STAKE)  # may join again
        assert c.is_active(node)

    def test_slash_sends_to_the_treasury(self, env: Env) -> None:
        c, node = env.chain, env.nodes[0]
        c.stake(node, MIN_STAKE + 100)
        receipt = c.slash(env.validator, node, 300, "task-1")
        event = one(c.events(receipt), "Slashed")
        assert event.args == {
            "node": node,
            "amount": 300,
            "taskId": ch.task_key("task-1"),
            "remaining": MIN_STAKE - 200,
        }
        assert c.stake_of(node) == MIN_STAKE - 200
        assert c.token_balance(env.treasury) == 300
        assert not c.is_active(node)  # below the minimum now

    def test_slash_during_the_cooldown(self, env: Env) -> None:
        """A wrong result found late still costs the stake: slashing works while unstaking."""
        c, node = env.chain, env.nodes[0]
        c.stake(node, MIN_STAKE)
        c.request_unstake(node)
        c.slash(env.validator, node, MIN_STAKE, "task-1")
        ch.increase_time(env.w3, COOLDOWN_S + 1)
        receipt = c.withdraw_stake(node)
        assert one(c.events(receipt), "Withdrawn").args["amount"] == 0
        assert c.token_balance(env.treasury) == MIN_STAKE

    def test_slash_more_than_staked_reverts(self, env: Env) -> None:
        c, node = env.chain, env.nodes[0]
        c.stake(node, MIN_STAKE)
        with reverted("SlashExceedsStake") as info:
            c.slash(env.validator, node, MIN_STAKE + 1, "task-1")
        assert info.value.args_by_name == {"node": node, "amount": MIN_STAKE + 1, "staked": MIN_STAKE}
        with reverted("SlashExceedsStake"):
            c.slash(env.validator, env.stranger, 1, "task-1")

    def test_slash_twice_for_one_task_reverts(self, env: Env) -> None:
        c, node = env.chain, env.nodes[0]
        c.stake(node, MIN_STAKE + 100)
        assert not c.slashed_for(node, "task-1")
        c.slash(env.validator, node, 10, "task-1")
        assert c.slashed_for(node, "task-1")
        with reverted("AlreadySlashed") as info:
            c.slash(env.validator, node, 10, "task-1")
        assert info.value.args_by_name == {"node": node, "taskId": ch.task_key("task-1")}
        c.slash(env.validator, node, 10, "task-2")  # another task is another slash
        assert c.stake_of(node) == MIN_STAKE + 80

    def test_slash_of_zero_reverts(self, env: Env) -> None:
        c, node = env.chain, env.nodes[0]
        c.stake(node, MIN_STAKE)
        with reverted("ZeroAmount"):
            c.slash(env.validator, node, 0, "task-1")

    def test_slash_by_other_than_the_validator_reverts(self, env: Env) -> None:
        c, node = env.chain, env.nodes[0]
        c.stake(node, MIN_STAKE)
        for who in (env.stranger, env.gateway, node):
            with reverted("AccessControlUnauthorizedAccount"):
                c.slash(who, node, 1, "task-1")
        assert c.stake_of(node) == MIN_STAKE

    # ------------------------------------------------------------ staking by an operator

    def test_a_node_that_staked_for_itself_is_its_own_owner(self, env: Env) -> None:
        c, node = env.chain, env.nodes[0]
        assert c.owner_of(node) is None
        c.stake(node, MIN_STAKE)
        assert c.owner_of(node) == node
        assert c.owner_of(env.stranger) is None

    def test_stake_for_makes_the_payer_the_owner(self, env: Env) -> None:
        c, operator, (n0, n1, _) = env.chain, env.stranger, env.nodes
        receipt = c.stake_for(operator, n0, MIN_STAKE)
        event = one(c.events(receipt), "Staked")
        assert event.args == {"node": n0, "owner": operator, "amount": MIN_STAKE, "total": MIN_STAKE}
        assert (c.owner_of(n0), c.stake_of(n0), c.is_active(n0)) == (operator, MIN_STAKE, True)
        assert c.token_balance(operator) == START_TOKENS - MIN_STAKE
        assert c.token_balance(n0) == START_TOKENS  # the node pays nothing
        receipt = c.stake_for(operator, n0, 5)  # the owner tops up
        assert one(c.events(receipt), "Staked").args["total"] == MIN_STAKE + 5
        c.stake_for(operator, n1, MIN_STAKE)  # one operator runs several nodes
        assert c.owner_of(n1) == operator
        assert c.token_balance(operator) == START_TOKENS - 2 * MIN_STAKE - 5

    def test_stake_for_follows_the_rules_of_stake(self, env: Env) -> None:
        c, operator, node = env.chain, env.stranger, env.nodes[0]
        with reverted("ZeroAmount"):
            c.stake_for(operator, node, 0)
        with reverted("StakeBelowMinimum") as info:
            c.stake_for(operator, node, MIN_STAKE - 1)
        assert info.value.args_by_name == {"total": MIN_STAKE - 1, "minimum": MIN_STAKE}
        with reverted("ERC20InsufficientAllowance"):
            c.stake_for(operator, node, MIN_STAKE, approve=False)
        with reverted("ZeroAddress") as zero:
            c.stake_for(operator, "0x" + "00" * 20, MIN_STAKE)
        assert zero.value.args_by_name == {"what": "node"}
        c.stake_for(operator, node, MIN_STAKE)
        c.request_unstake(operator, node)
        with reverted("UnstakePending"):
            c.stake_for(operator, node, MIN_STAKE)

    def test_no_one_adds_to_a_node_another_address_owns(self, env: Env) -> None:
        c, operator, (n0, n1, _) = env.chain, env.stranger, env.nodes
        c.stake(n0, MIN_STAKE)
        with reverted("NotStakeOwner") as info:  # a node that staked for itself is not an operator's
            c.stake_for(operator, n0, MIN_STAKE)
        assert info.value.args_by_name == {"node": n0, "caller": operator, "owner": n0}
        c.stake_for(operator, n1, MIN_STAKE)
        with reverted("NotStakeOwner") as info:  # nor is an operator's node its own
            c.stake(n1, MIN_STAKE)
        assert info.value.args_by_name == {"node": n1, "caller": n1, "owner": operator}
        with reverted("NotStakeOwner"):  # nor another operator's
            c.stake_for(env.app, n1, MIN_STAKE)
        assert (c.stake_of(n0), c.stake_of(n1), c.owner_of(n1)) == (MIN_STAKE, MIN_STAKE, operator)

    def test_the_owner_unstakes_and_withdraws_to_itself(self, env: Env) -> None:
        c, operator, node = env.chain, env.stranger, env.nodes[0]
        c.stake_for(operator, node, MIN_STAKE)
        receipt = c.request_unstake(operator, node)
        now = env.w3.eth.get_block(receipt["blockNumber"])["timestamp"]
        assert one(c.events(receipt), "UnstakeRequested").args == {
            "node": node,
            "owner": operator,
            "amount": MIN_STAKE,
            "availableAt": now + COOLDOWN_S,
        }
        assert not c.is_active(node)
        with reverted("CooldownNotOver"):
            c.withdraw_stake(operator, node)
        ch.increase_time(env.w3, COOLDOWN_S + 1)
        receipt = c.withdraw_stake(operator, node)
        assert one(c.events(receipt), "Withdrawn").args == {"node": node, "owner": operator, "amount": MIN_STAKE}
        assert c.token_balance(operator) == START_TOKENS
        assert c.token_balance(node) == START_TOKENS
        assert (c.stake_of(node), c.owner_of(node)) == (0, None)
        c.stake(node, MIN_STAKE)  # free again: the node may now stake for itself
        assert c.owner_of(node) == node

    def test_only_the_owner_unstakes_or_withdraws(self, env: Env) -> None:
        c, operator, node = env.chain, env.stranger, env.nodes[0]
        c.stake_for(operator, node, MIN_STAKE)
        with reverted("NotStakeOwner") as info:
            c.request_unstake(node)  # the node itself, not its owner
        assert info.value.args_by_name == {"node": node, "caller": node, "owner": operator}
        with reverted("NotStakeOwner"):
            c.request_unstake(env.app, node)
        c.request_unstake(operator, node)
        ch.increase_time(env.w3, COOLDOWN_S + 1)
        with reverted("NotStakeOwner"):
            c.withdraw_stake(node)
        with reverted("NotStakeOwner"):
            c.withdraw_stake(env.app, node)
        assert c.stake_of(node) == MIN_STAKE
        c.withdraw_stake(operator, node)

    def test_a_node_that_is_its_own_owner_may_use_the_for_functions(self, env: Env) -> None:
        c, node = env.chain, env.nodes[0]
        with reverted("NotStaked"):
            c.request_unstake(env.stranger, node)
        c.stake(node, MIN_STAKE)
        c.request_unstake(node, node)
        ch.increase_time(env.w3, COOLDOWN_S + 1)
        c.withdraw_stake(node, node)
        assert c.token_balance(node) == START_TOKENS

    def test_a_slashed_operators_node_returns_what_is_left_to_the_owner(self, env: Env) -> None:
        c, operator, node = env.chain, env.stranger, env.nodes[0]
        c.stake_for(operator, node, MIN_STAKE)
        c.slash(env.validator, node, MIN_STAKE, "task-1")  # all of it
        assert (c.stake_of(node), c.owner_of(node)) == (0, operator)
        with reverted("NotStakeOwner"):  # slashed to nothing, still the owner's node
            c.stake_for(env.app, node, MIN_STAKE)
        c.request_unstake(operator, node)  # the owner can still let it go
        ch.increase_time(env.w3, COOLDOWN_S + 1)
        receipt = c.withdraw_stake(operator, node)
        assert one(c.events(receipt), "Withdrawn").args == {"node": node, "owner": operator, "amount": 0}
        assert c.owner_of(node) is None
        assert c.token_balance(operator) == START_TOKENS - MIN_STAKE
        assert c.token_balance(env.treasury) == MIN_STAKE

    # ------------------------------------------------------------ payment: balances

    def test_deposit_and_withdraw(self, env: Env) -> None:
        c, app = env.chain, env.app
        receipt = c.deposit(app, 500)
        assert one(c.events(receipt), "Deposited").args == {"account": app, "amount": 500, "balance": 500}
        assert c.balance_of(app) == 500
        receipt = c.withdraw(app, 200)
        assert one(c.events(receipt), "Withdrawn").args == {"account": app, "amount": 200, "balance": 300}
        assert c.balance_of(app) == 300
        assert c.token_balance(app) == START_TOKENS - 300
        self.assert_payment_solvent(env)

    def test_deposit_of_zero_reverts(self, env: Env) -> None:
        with reverted("ZeroAmount"):
            env.chain.deposit(env.app, 0)

    def test_withdraw_of_zero_reverts(self, env: Env) -> None:
        with reverted("ZeroAmount"):
            env.chain.withdraw(env.app, 0)

    def test_withdraw_more_than_deposited_reverts(self, env: Env) -> None:
        c, app = env.chain, env.app
        c.deposit(app, 500)
        with reverted("InsufficientBalance") as info:
            c.withdraw(app, 501)
        assert info.value.args_by_name == {"account": app, "balance": 500, "needed": 501}

    # ------------------------------------------------------------ payment: escrow

    def test_escrow_moves_the_fee_out_of_the_balance(self, env: Env) -> None:
        c, app = env.chain, env.app
        c.deposit(app, 500)
        receipt = c.escrow(env.gateway, "task-1", app, 120)
        event = one(c.events(receipt), "Escrowed")
        assert event.args == {"taskId": ch.task_key("task-1"), "app": app, "fee": 120}
        assert c.balance_of(app) == 380
        assert c.total_escrowed() == 120
        assert c.task("task-1") == ch.TaskRecord(app=app, fee=120, state=TaskState.ESCROWED)
        assert c.task("never-seen").state is TaskState.NONE
        with reverted("InsufficientBalance"):
            c.withdraw(app, 381)  # escrowed tokens are not the app's to withdraw

    def test_escrow_many_in_one_transaction_all_or_none(self, env: Env) -> None:
        c, app = env.chain, env.app
        c.deposit(app, 500)
        before = c.balance_of(app)
        receipt = c.escrow_many(env.gateway, [("m-1", app, 10), ("m-2", app, 20), ("m-3", app, 30)])
        assert [e.args["fee"] for e in c.events(receipt) if e.name == "Escrowed"] == [10, 20, 30]
        assert c.balance_of(app) == before - 60
        assert c.task("m-2").state == TaskState.ESCROWED
        with reverted("TaskAlreadyEscrowed"):  # one bad task: nothing of the batch happens
            c.escrow_many(env.gateway, [("m-4", app, 5), ("m-1", app, 5)])
        assert c.task("m-4").state == TaskState.NONE
        assert c.balance_of(app) == before - 60
        with reverted("AccessControlUnauthorizedAccount"):
            c.escrow_many(env.stranger, [("m-5", app, 5)])

    def test_escrow_twice_reverts(self, env: Env) -> None:
        c = env.chain
        self.escrowed(env, "task-1")
        c.deposit(env.app, 100)
        with reverted("TaskAlreadyEscrowed"):
            c.escrow(env.gateway, "task-1", env.app, 100)

    def test_escrow_more_than_the_balance_reverts(self, env: Env) -> None:
        c, app = env.chain, env.app
        c.deposit(app, 99)
        with reverted("InsufficientBalance") as info:
            c.escrow(env.gateway, "task-1", app, 100)
        assert info.value.args_by_name == {"account": app, "balance": 99, "needed": 100}

    def test_escrow_by_other_than_the_gateway_reverts(self, env: Env) -> None:
        c, app = env.chain, env.app
        c.deposit(app, 100)
        for who in (app, env.stranger, env.settler):
            with reverted("AccessControlUnauthorizedAccount"):
                c.escrow(who, "task-1", app, 100)

    def test_escrow_for_the_zero_address_reverts(self, env: Env) -> None:
        with reverted("ZeroAddress"):
            env.chain.escrow(env.gateway, "task-1", "0x" + "00" * 20, 0)

    def test_escrow_of_a_fee_over_uint88_reverts(self, env: Env) -> None:
        with reverted("FeeTooLarge"):
            env.chain.escrow(env.gateway, "task-1", env.app, 2**88)

    # ------------------------------------------------------------ payment: settle

    def test_settle_pays_by_share_with_the_dust_to_the_first_node(self, env: Env) -> None:
        c, (n0, n1, n2) = env.chain, env.nodes
        self.escrowed(env, "task-1", fee=100)
        receipt = c.settle(env.settler, [Settlement("task-1", [n0, n1, n2], [1, 1, 1])])
        event = one(c.events(receipt), "Settled")
        assert event.args == {
            "taskId": ch.task_key("task-1"),
            "app": env.app,
            "fee": 100,
            "nodes": [n0, n1, n2],
            "amounts": [34, 33, 33],
        }
        assert [c.balance_of(n) for n in env.nodes] == [34, 33, 33]
        assert c.task("task-1").state is TaskState.SETTLED
        assert c.total_escrowed() == 0
        self.assert_payment_solvent(env)

    def test_settle_by_qos_shares(self, env: Env) -> None:
        c, (n0, n1, n2) = env.chain, env.nodes
        self.escrowed(env, "task-1", fee=1_000)
        c.settle(env.settler, [Settlement("task-1", [n0, n1, n2], [50, 30, 20])])
        assert [c.balance_of(n) for n in env.nodes] == [500, 300, 200]
        c.withdraw(n1, 300)  # earnings are withdrawn like any balance
        assert c.token_balance(n1) == START_TOKENS + 300

    def test_settle_with_a_zero_share_pays_that_node_nothing(self, env: Env) -> None:
        c, (n0, n1, n2) = env.chain, env.nodes
        self.escrowed(env, "task-1", fee=7)
        c.settle(env.settler, [Settlement("task-1", [n0, n1, n2], [0, 2, 1])])
        assert [c.balance_of(n) for n in env.nodes] == [1, 4, 2]  # 0 + dust 1, floor(14/3), floor(7/3)

    def test_settle_never_pays_more_than_escrowed(self, env: Env) -> None:
        """Huge, awkward shares: the nodes get exactly the fee, the app pays nothing more."""
        c, nodes = env.chain, env.nodes
        fee = 10**18 + 1
        c.mint(env.admin, env.app, fee)
        self.escrowed(env, "task-1", fee=fee)
        app_before = c.balance_of(env.app)
        c.settle(env.settler, [Settlement("task-1", nodes, [2**200, 3, 2**255])])
        assert sum(c.balance_of(n) for n in nodes) == fee
        assert c.balance_of(env.app) == app_before
        self.assert_payment_solvent(env)

    def test_settle_of_a_task_never_escrowed_reverts(self, env: Env) -> None:
        with reverted("TaskNotEscrowed"):
            env.chain.settle(env.settler, [Settlement("task-1", env.nodes, [1, 1, 1])])

    def test_settle_twice_reverts(self, env: Env) -> None:
        c = env.chain
        self.escrowed(env, "task-1")
        c.settle(env.settler, [Settlement("task-1", env.nodes, [1, 1, 1])])
        with reverted("TaskAlreadySettled") as info:
            c.settle(env.settler, [Settlement("task-1", env.nodes, [1, 1, 1])])
        assert info.value.args_by_name == {"taskId": ch.task_key("task-1")}
        assert sum(c.balance_of(n) for n in env.nodes) == 100

    def test_settle_the_same_task_twice_in_one_batch_reverts(self, env: Env) -> None:
        c = env.chain
        self.escrowed(env, "task-1")
        s = Settlement("task-1", env.nodes, [1, 1, 1])
        with reverted("TaskAlreadySettled"):
            c.settle(env.settler, [s, s])
        assert c.task("task-1").state is TaskState.ESCROWED

    def test_settle_a_refunded_task_reverts(self, env: Env) -> None:
        c = env.chain
        self.escrowed(env, "task-1")
        c.refund(env.settler, ["task-1"])
        with reverted("TaskAlreadyRefunded"):
            c.settle(env.settler, [Settlement("task-1", env.nodes, [1, 1, 1])])

    def test_a_batch_with_one_bad_task_settles_none(self, env: Env) -> None:
        c = env.chain
        self.escrowed(env, "task-1", "task-2")
        with reverted("TaskNotEscrowed"):
            c.settle(env.settler, [Settlement(t, env.nodes, [1, 1, 1]) for t in ("task-1", "task-2", "task-3")])
        assert c.task("task-1").state is TaskState.ESCROWED
        assert c.total_escrowed() == 200

    def test_settle_by_other_than_the_settler_reverts(self, env: Env) -> None:
        c = env.chain
        self.escrowed(env, "task-1")
        for who in (env.gateway, env.stranger, env.nodes[0]):
            with reverted("AccessControlUnauthorizedAccount"):
                c.settle(who, [Settlement("task-1", env.nodes, [1, 1, 1])])

    def test_settle_rejects_malformed_batches(self, env: Env) -> None:
        """What `Settlement` refuses in Python, the contract refuses too (for other callers)."""
        c, key = env.chain, ch.task_key("task-1")
        self.escrowed(env, "task-1")
        pay = c.payment.functions
        cases = [
            ("LengthMismatch", pay.settle([key], [], [])),
            ("LengthMismatch", pay.settle([key], [env.nodes], [])),
            ("LengthMismatch", pay.settle([key], [env.nodes], [[1, 1]])),
            ("NoNodes", pay.settle([key], [[]], [[]])),
            ("ZeroShares", pay.settle([key], [env.nodes], [[0, 0, 0]])),
            ("ZeroAddress", pay.settle([key], [["0x" + "00" * 20]], [[1]])),
        ]
        for error, call in cases:
            with reverted(error):
                ch._transact(env.w3, call, env.settler, "TaskPayment", "settle", c._errors)

    def test_batch_settle_of_many_tasks_in_one_transaction(self, env: Env) -> None:
        c, n = env.chain, 30
        task_ids = [f"batch-{i}" for i in range(n)]
        self.escrowed(env, *task_ids, fee=90)
        receipt = c.settle(env.settler, [Settlement(t, env.nodes, [1, 1, 1]) for t in task_ids])
        settled = [e for e in c.events(receipt) if e.name == "Settled"]
        assert [e.args["taskId"] for e in settled] == [ch.task_key(t) for t in task_ids]
        assert all(c.task(t).state is TaskState.SETTLED for t in task_ids)
        assert [c.balance_of(x) for x in env.nodes] == [30 * n] * 3
        assert c.total_escrowed() == 0
        self.assert_payment_solvent(env)

    # ------------------------------------------------------------ payment: refund

    def test_refund_returns_the_fee_to_the_app(self, env: Env) -> None:
        c = env.chain
        self.escrowed(env, "task-1", "task-2", fee=100)
        assert c.balance_of(env.app) == 0
        receipt = c.refund(env.settler, ["task-1", "task-2"])
        assert [e.args for e in c.events(receipt)] == [
            {"taskId": ch.task_key("task-1"), "app": env.app, "fee": 100},
            {"taskId": ch.task_key("task-2"), "app": env.app, "fee": 100},
        ]
        assert names(c.events(receipt)) == ["Refunded", "Refunded"]
        assert c.balance_of(env.app) == 200
        assert c.task("task-1").state is TaskState.REFUNDED
        assert c.total_escrowed() == 0
        c.withdraw(env.app, 200)
        self.assert_payment_solvent(env)

    def test_refund_twice_reverts(self, env: Env) -> None:
        c = env.chain
        self.escrowed(env, "task-1")
        c.refund(env.settler, ["task-1"])
        with reverted("TaskAlreadyRefunded"):
            c.refund(env.settler, ["task-1"])
        with reverted("TaskAlreadyRefunded"):
            c.refund(env.settler, ["task-1", "task-1"][1:])
        assert c.balance_of(env.app) == 100

    def test_refund_a_settled_task_reverts(self, env: Env) -> None:
        c = env.chain
        self.escrowed(env, "task-1")
        c.settle(env.settler, [Settlement("task-1", env.nodes, [1, 1, 1])])
        with reverted("TaskAlreadySettled"):
            c.refund(env.settler, ["task-1"])

    def test_refund_of_a_task_never_escrowed_reverts(self, env: Env) -> None:
        with reverted("TaskNotEscrowed"):
            env.chain.refund(env.settler, ["task-1"])

    def test_refund_by_other_than_the_settler_reverts(self, env: Env) -> None:
        c = env.chain
        self.escrowed(env, "task-1")
        for who in (env.gateway, env.app, env.stranger):
            with reverted("AccessControlUnauthorizedAccount"):
                c.refund(who, ["task-1"])


class TestEmbedded(ContractSuite):
    """The in-process EVM: eth-tester on py-evm, what `stipple up` uses by default."""

    @pytest.fixture(scope="class")
    @classmethod
    def w3(cls) -> Web3:
        return ch.connect(ch.EMBEDDED_URL)


@pytest.mark.integration
class TestAnvil(ContractSuite):
    """anvil, a real JSON-RPC node (Foundry), from the npm package the project pins (the
    session's `anvil`, conftest.py)."""

    @pytest.fixture(scope="class")
    @classmethod
    def w3(cls, anvil: ch.Anvil) -> Web3:
        return ch.connect(anvil.url)


# ---------------------------------------------------------------- without a chain


def test_task_key_is_keccak_of_the_id() -> None:
    assert ch.task_key("abc") == Web3.keccak(text="abc")
    assert len(ch.task_key("abc")) == 32
    with pytest.raises(ValueError, match="task_id"):
        ch.task_key("")


def test_settlement_checks_its_shares() -> None:
    with pytest.raises(ValueError, match="nodes must not be empty"):
        Settlement("t", [], [])
    with pytest.raises(ValueError, match=r"2 nodes but 1 shares \(\[1\]\)"):
        Settlement("t", ["0x1", "0x2"], [1])
    with pytest.raises(ValueError, match=r"not all 0 \(got \[0, 0\]\)"):
        Settlement("t", ["0x1", "0x2"], [0, 0])
    with pytest.raises(ValueError, match=r"got \[-1, 2\]"):
        Settlement("t", ["0x1", "0x2"], [-1, 2])


def test_connect_names_a_bad_url() -> None:
    with pytest.raises(ch.ChainError, match="'ftp://x'"):
        ch.connect("ftp://x")


def test_connect_to_nothing_is_unavailable() -> None:
    with pytest.raises(ch.ChainUnavailable, match="no JSON-RPC answer") as info:
        ch.connect("http://127.0.0.1:9", timeout_s=1)
    assert info.value.retryable


def test_load_artifacts_from_an_override(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(ch.ChainError, match="StippleToken.json not found"):
        ch.load_artifacts(tmp_path)
    arts = ch.load_artifacts()
    assert set(arts) == set(ch.CONTRACT_NAMES)
    assert arts["TaskPayment"].compiler["settings"]["evmVersion"] == "cancun"


@pytest.mark.integration
def test_a_node_that_went_away_is_unavailable(anvil: ch.Anvil) -> None:
    """A transaction to a JSON-RPC node that stopped answering raises the retryable ChainUnavailable."""
    with ch.Anvil.start() as node:
        w3 = ch.connect(node.url, timeout_s=2)
        admin, other = w3.eth.accounts[0], w3.eth.accounts[1]
        chain = StippleChain(
            w3, ch.deploy_all(w3, w3.eth.accounts[0], min_stake=1, cooldown_s=1, treasury=w3.eth.accounts[9])
        )
    with pytest.raises(ch.ChainUnavailable, match=r"StippleToken\.mint: the chain node did not answer") as info:
        chain.mint(admin, other, 1)
    assert info.value.retryable
