import Foundation
import HeraldCore
import HeraldStore
import Logging

extension HeraldService {
    func listGroups(_ input: Operations.ListGroups.Input) async throws -> Operations.ListGroups.Output {
        let (limit, cursor) = try page(input.query.limit, input.query.cursor)
        let page = try await tenant { tx, _ in try await tx.groups(limit: limit, after: cursor) }
        return .ok(.init(body: .json(.init(items: page.items.map(Components.Schemas.Group.init), nextCursor: page.next?.encoded))))
    }

    func getGroup(_ input: Operations.GetGroup.Input) async throws -> Operations.GetGroup.Output {
        let id = try id(input.path.groupId, "group")
        let group = try await tenant { tx, _ in try await tx.group(id) }
        return .ok(.init(body: .json(.init(group))))
    }

    func createGroup(_ input: Operations.CreateGroup.Input) async throws -> Operations.CreateGroup.Output {
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        let (key, name) = (try Validate.key(body.key), try Validate.text(body.name, field: "name"))
        let created = try await tenant { tx, _ in
            let group = Components.Schemas.Group(try await tx.createGroup(key: key, name: name, description: body.description ?? ""))
            try await tx.audit(action: "group.create", targetType: "group", targetID: group.id, before: nil, after: try auditValue(group))
            return group
        }
        return .created(.init(body: .json(created)))
    }

    func updateGroup(_ input: Operations.UpdateGroup.Input) async throws -> Operations.UpdateGroup.Output {
        let id = try id(input.path.groupId, "group")
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        try requireSomeChange(body)
        let name = try body.name.map { v in try Validate.text(v, field: "name") }
        let updated = try await tenant { tx, _ in
            let before = Components.Schemas.Group(try await tx.group(id))
            let after = Components.Schemas.Group(try await tx.updateGroup(id, name: name, description: body.description))
            try await tx.audit(
                action: "group.update", targetType: "group", targetID: after.id, before: try auditValue(before),
                after: try auditValue(after))
            return after
        }
        return .ok(.init(body: .json(updated)))
    }

    func deleteGroup(_ input: Operations.DeleteGroup.Input) async throws -> Operations.DeleteGroup.Output {
        let id = try id(input.path.groupId, "group")
        try await tenant { tx, _ in
            let before = Components.Schemas.Group(try await tx.group(id))
            try await tx.deleteGroup(id)
            try await tx.audit(action: "group.delete", targetType: "group", targetID: before.id, before: try auditValue(before), after: nil)
        }
        return .noContent(.init())
    }

    func listGroupMembers(_ input: Operations.ListGroupMembers.Input) async throws -> Operations.ListGroupMembers.Output {
        let id = try id(input.path.groupId, "group")
        let (limit, cursor) = try page(input.query.limit, input.query.cursor)
        let page = try await tenant { tx, _ in try await tx.groupMembers(id, limit: limit, after: cursor) }
        return .ok(.init(body: .json(.init(items: try page.items.map(Components.Schemas.User.init), nextCursor: page.next?.encoded))))
    }

    func addGroupMember(_ input: Operations.AddGroupMember.Input) async throws -> Operations.AddGroupMember.Output {
        try await changeMembership(group: input.path.groupId, user: input.path.userId, add: true)
        return .noContent(.init())
    }

    func removeGroupMember(_ input: Operations.RemoveGroupMember.Input) async throws -> Operations.RemoveGroupMember.Output {
        try await changeMembership(group: input.path.groupId, user: input.path.userId, add: false)
        return .noContent(.init())
    }

    private func changeMembership(group rawGroup: String, user rawUser: String, add: Bool) async throws {
        let groupID = try id(rawGroup, "group")
        let userID = try id(rawUser, "user")
        try await tenant { tx, _ in
            let changed = add ? try await tx.addGroupMember(groupID, userID) : try await tx.removeGroupMember(groupID, userID)
            if changed {
                try await tx.audit(
                    action: add ? "group.member.add" : "group.member.remove", targetType: "group",
                    targetID: groupID.lowercased, before: nil, after: try auditValue(["user_id": userID.lowercased]))
            }
        }
    }
}
