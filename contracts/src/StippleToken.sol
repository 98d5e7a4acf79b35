// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @title Stipple token
/// @notice The ERC-20 that nodes stake and apps pay fees in. New tokens come only from
/// holders of MINTER_ROLE (a faucet on test networks, the tests themselves).
contract StippleToken is ERC20, AccessControl {
    bytes32 public constant MINTER_ROLE = keccak256("MINTER_ROLE");

    /// @param admin gets DEFAULT_ADMIN_ROLE (grants and revokes roles) and MINTER_ROLE.
    constructor(address admin) ERC20("Stipple", "STPL") {
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(MINTER_ROLE, admin);
    }

    /// @notice Creates `amount` new tokens for `to`.
    function mint(address to, uint256 amount) external onlyRole(MINTER_ROLE) {
        _mint(to, amount);
    }
}
