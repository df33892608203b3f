/*
 * list: the one intrusive doubly linked list, circular with a head node (the idea of libuv's
 * queue.h). An element embeds an mg_list_t and is found from it with mg_list_entry(). A node
 * that is on no list points at itself, so removing it twice is harmless. Public because the
 * pool's caller-allocated requests (mg_pool_acquire_t) sit on one.
 */
#ifndef MOONGATE_LIST_H
#define MOONGATE_LIST_H

#include <stdbool.h>
#include <stddef.h>

typedef struct mg_list {
    struct mg_list *next, *prev;
} mg_list_t;

#define mg_list_entry(node, type, member) ((type *)((char *)(node) - offsetof(type, member)))

/* Makes head an empty list, or a node "on no list". */
static inline void mg_list_init(mg_list_t *head)
{
    head->next = head->prev = head;
}

static inline bool mg_list_empty(const mg_list_t *head)
{
    return head->next == head;
}

/* For a node: whether it is on a list. */
static inline bool mg_list_linked(const mg_list_t *node)
{
    return node->next != node;
}

static inline void mg_list_insert_tail(mg_list_t *head, mg_list_t *node)
{
    node->prev = head->prev;
    node->next = head;
    head->prev->next = node;
    head->prev = node;
}

static inline void mg_list_insert_head(mg_list_t *head, mg_list_t *node)
{
    node->next = head->next;
    node->prev = head;
    head->next->prev = node;
    head->next = node;
}

static inline void mg_list_remove(mg_list_t *node)
{
    node->prev->next = node->next;
    node->next->prev = node->prev;
    node->next = node->prev = node;
}

/* The first node, or NULL when empty. */
static inline mg_list_t *mg_list_first(const mg_list_t *head)
{
    return head->next == head ? NULL : head->next;
}

/* Iterates with n the node; the body must not remove it. */
#define mg_list_foreach(n, head) for ((n) = (head)->next; (n) != (head); (n) = (n)->next)

/* Iterates with n the node and tmp its successor, so that n may be removed in the body. */
#define mg_list_foreach_safe(n, tmp, head) \
    for ((n) = (head)->next, (tmp) = (n)->next; (n) != (head); (n) = (tmp), (tmp) = (n)->next)

#endif
