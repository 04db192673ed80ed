/// Runs `body` in a child task and returns what it returns. For deep work done on behalf of a
/// long-lived connection's task (a live stream's authentication and reads): a Swift task keeps
/// the largest stack of async frames it ever needed until it ends (its allocator keeps its
/// slabs), so such work done in the connection's own task would stay in memory for the life of
/// the connection, a live stream's included.
func inChildTask<Value: Sendable>(_ body: @escaping @Sendable () async throws -> Value) async throws -> Value {
    try await withThrowingTaskGroup(of: Value.self) { group in
        group.addTask(operation: body)
        guard let value = try await group.next() else { throw CancellationError() }
        return value
    }
}
