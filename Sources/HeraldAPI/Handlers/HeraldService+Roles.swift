import Foundation
import HeraldCore
import HeraldStore
import Logging

extension HeraldService {
    func listRoles(_ input: Operations.ListRoles.Input) async throws -> Operations.ListRoles.Output {
        let roles = try await tenant { tx, _ in try await tx.roles() }
        return .ok(.init(body: .json(.init(items: roles.map(Components.Schemas.Role.init)))))
    }

    func getRole(_ input: Operations.GetRole.Input) async throws -> Operations.GetRole.Output {
        let id = try id(input.path.roleId, "role")
        let role = try await tenant { tx, _ in try await tx.role(id) }
        return .ok(.init(body: .json(.init(role))))
    }

    func createRole(_ input: Operations.CreateRole.Input) async throws -> Operations.CreateRole.Output {
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        let (key, name, permissions) = (
            try Validate.key(body.key), try Validate.text(body.name, field: "name"), try Validate.permissions(body.permissions)
        )
        let description = body.description ?? ""
        let created = try await tenant { tx, principal in
            try requireHolds(permissions, principal)
            let role = Components.Schemas.Role(
                try await tx.createRole(key: key, name: name, description: description, permissions: permissions))
            try await tx.audit(action: "role.create", targetType: "role", targetID: role.id, before: nil, after: try auditValue(role))
            return role
        }
        return .created(.init(body: .json(created)))
    }

    func updateRole(_ input: Operations.UpdateRole.Input) async throws -> Operations.UpdateRole.Output {
        let id = try id(input.path.roleId, "role")
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        try requireSomeChange(body)
        let name = try body.name.map { v in try Validate.text(v, field: "name") }
        let permissions = try body.permissions.map { v in try Validate.permissions(v) }
        let updated = try await tenant { tx, principal in
            let existing = try await tx.role(id)
            guard !existing.builtin else { throw APIError.conflict("Built-in roles cannot be changed; create a custom role instead.") }
            if let permissions {
                // Adding or removing a permission needs it: the symmetric difference.
                try requireHolds(permissions.symmetricDifference(existing.permissions), principal)
            }
            let role = try await tx.updateRole(id, name: name, description: body.description, permissions: permissions)
            try await tx.audit(
                action: "role.update", targetType: "role", targetID: id.lowercased,
                before: try auditValue(Components.Schemas.Role(existing)), after: try auditValue(Components.Schemas.Role(role)))
            return role
        }
        return .ok(.init(body: .json(.init(updated))))
    }

    func deleteRole(_ input: Operations.DeleteRole.Input) async throws -> Operations.DeleteRole.Output {
        let id = try id(input.path.roleId, "role")
        try await tenant { tx, principal in
            let existing = try await tx.role(id)
            guard !existing.builtin else { throw APIError.conflict("Built-in roles cannot be deleted.") }
            try requireHolds(existing.permissions, principal)
            // The role's revoked keys go with it (`deleteRole`): each removal is audited too.
            for key in try await tx.deleteRole(id) {
                let shown = Components.Schemas.ApiKey(key, organisationID: principal.organisationID)
                try await tx.audit(
                    action: "apikey.delete", targetType: "api_key", targetID: shown.id, before: try auditValue(shown), after: nil)
            }
            try await tx.audit(
                action: "role.delete", targetType: "role", targetID: id.lowercased,
                before: try auditValue(Components.Schemas.Role(existing)), after: nil)
        }
        return .noContent(.init())
    }
}
