import Foundation
import HeraldCore
import HeraldStore
import Logging

extension HeraldService {
    func listAuditEntries(_ input: Operations.ListAuditEntries.Input) async throws -> Operations.ListAuditEntries.Output {
        let (limit, cursor) = try page(input.query.limit, input.query.cursor)
        let page = try await tenant { tx, _ in
            try await tx.auditEntries(
                action: input.query.action,
                targetID: try input.query.targetId.map { v in try Validate.uuid(v, field: "target_id").lowercased }, limit: limit,
                after: cursor)
        }
        if page.items.isEmpty, let action = input.query.action, !AuditAction.known.contains(action) {
            // Checked on an empty page only: entries of an action since renamed still list.
            let near = AuditAction.known.filter { $0.hasPrefix(action.split(separator: ".").first.map(String.init) ?? action) }.sorted()
            throw APIError.unprocessable(
                ValidationError(
                    field: "action",
                    message: "\"\(action)\" is not an action Herald records"
                        + (near.isEmpty ? " (actions look like user.create)." : "; of the same kind: \(near.joined(separator: ", ")).")))
        }
        return .ok(.init(body: .json(.init(items: try page.items.map(Components.Schemas.AuditEntry.init), nextCursor: page.next?.encoded))))
    }
}
